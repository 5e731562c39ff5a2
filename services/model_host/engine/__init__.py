"""The serving engine for decoders: continuous (iteration-level) batching.

Per loaded decoder, one `DecoderEngine` (loop.py) runs a scheduler loop on its own thread:
requests join and leave between steps (scheduler.py), each sequence keeps its own sampling
state (sequence.py), and KV caches live in preallocated per-slot buffers (kv_slots.py).
`EngineHook` gives each decoder its engine when it loads and stops it when it unloads.
"""

from __future__ import annotations

from typing import Callable

from services.model_host.engine.kv_slots import decoder_cache_bytes
from services.model_host.engine.loop import DecoderEngine, EngineSettings
from services.model_host.registry import ModelRecord
from services.model_host.runtimes.decoder import DecoderRuntime

__all__ = ["DecoderEngine", "EngineHook", "EngineSettings"]


class EngineHook:
    """RegistryHook: an engine per loaded decoder. `settings_for` gives a model's engine settings
    (its slots and context from the fleet spec)."""

    def __init__(self, settings_for: Callable[[ModelRecord], EngineSettings],
                 on_step: Callable[[str, int], None] | None = None,
                 on_prefix_reuse: Callable[[str, str, int], None] | None = None):
        self.settings_for = settings_for
        self.on_step = on_step
        self.on_prefix_reuse = on_prefix_reuse  # (model, "generate" | "score", tokens): metrics
        self.engines: dict[str, DecoderEngine] = {}

    def reserved_bytes(self, record: ModelRecord) -> int:
        """KV memory the model holds for its engine's slots and Score's prefix cache (counted in its
        size; known before a load)."""
        if record.spec.task != "text-generation" or record.manifest is None:
            return 0
        settings = self.settings_for(record)
        return decoder_cache_bytes(record.manifest.generation, settings.max_num_seqs, settings.max_context)

    def on_model_load(self, record: ModelRecord) -> None:
        if isinstance(record.runtime, DecoderRuntime):
            step = (lambda size, name=record.name: self.on_step(name, size)) if self.on_step else None
            engine = self.engines[record.name] = DecoderEngine(record.name, record.runtime, self.settings_for(record), step)
            if self.on_prefix_reuse is not None:
                reuse = self.on_prefix_reuse
                engine.prefixes.on_reuse = lambda tokens, name=record.name: reuse(name, "generate", tokens)
                record.runtime.prefix_cache.on_reuse = lambda tokens, name=record.name: reuse(name, "score", tokens)

    def on_model_unload(self, record: ModelRecord) -> None:
        engine = self.engines.pop(record.name, None)
        if engine is not None:
            engine.stop()

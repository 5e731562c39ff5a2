"""`mirador config check`: models that no model host could ever hold.

A model is loaded whole on one host, so one larger than the hosts' memory budget cannot be
served however many hosts there are; placement would only find that out at the first call.
Its size is what the model host will count against the budget before loading it: its files
times the host's estimate factor, plus a decoder's KV slots (`max_num_seqs` x `max_context`).
Models not built yet are skipped (`mirador fleet build` writes them; the host refuses them
with the same sizes if they turn out too large).
"""

from __future__ import annotations

import yaml

from services.common.config import ConfigProblem, MiradorConfig
from services.common.model_repository import ModelNotFoundError, ModelRepository, ModelRepositoryError

MB = 2**20


def estimated_bytes(config: MiradorConfig, name: str, repository: ModelRepository) -> tuple[int, str] | None:
    """(bytes, how they add up) for a built model of the fleet; None when it is not built."""
    from services.model_host.engine.kv_slots import decoder_cache_bytes, reserved_bytes_for  # the host's own formulas
    from services.model_host.registry import ESTIMATE_FACTOR

    spec = config.fleet[name]
    try:
        manifest = repository.get(spec.artifact, spec.version)
    except (ModelNotFoundError, ModelRepositoryError):
        return None
    files = int(manifest.size_bytes * ESTIMATE_FACTOR)
    # Only decoders hold KV slots; an encoder or a classifier has `generation` facts but no cache.
    decoder = spec.task == "text-generation" and "past_key_values" in (manifest.generation or {})
    kv = decoder_cache_bytes(manifest.generation, spec.max_num_seqs, spec.max_context) if decoder else 0
    how = f"{manifest.size_bytes / MB:.0f} MB of files x {ESTIMATE_FACTOR:g}"
    if kv:
        slots = reserved_bytes_for(manifest.generation, spec.max_num_seqs, spec.max_context)
        how += (f" + {slots / MB:.0f} MB of KV slots ({spec.max_num_seqs} x {spec.max_context} tokens)"
                f" + {(kv - slots) / MB:.0f} MB of prefix caches")
    return files + kv, how


def oversized_models(config: MiradorConfig) -> list[ConfigProblem]:
    budget = config.services.model_host.memory_budget_mb * MB
    if not budget:
        return []
    repository = ModelRepository(config.model_repository)
    lines = _fleet_lines(config)
    problems = []
    for name, spec in config.fleet.items():
        if spec.repository_name:  # a rollout candidate: checked with its model
            continue
        estimate = estimated_bytes(config, name, repository)
        if estimate is None or estimate[0] <= budget:
            continue
        size, how = estimate
        problems.append(ConfigProblem(
            str(config.path), lines.get(name, 0), f"fleet.{name}",
            f"needs about {size / MB:.0f} MB ({how}), more than a model host's memory budget "
            f"(services.model_host.memory_budget_mb: {budget // MB} MB), so no host could load it; raise the "
            "budget, lower max_num_seqs or max_context, quantize it (mirador quantize), or remove it"))
    return problems


def _fleet_lines(config: MiradorConfig) -> dict[str, int]:
    try:
        root = yaml.compose(config.path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except (OSError, yaml.YAMLError):
        return {}
    for key, value in getattr(root, "value", []):
        if key.value == "fleet" and isinstance(value, yaml.MappingNode):
            return {k.value: k.start_mark.line + 1 for k, _ in value.value}
    return {}

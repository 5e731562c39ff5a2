"""What the model host tells Prometheus and the tracing backend.

* `ObservabilityHook`, a `RegistryHook`: counts loads, evictions and unloads, times loads
  (a `model.load` span in the trace of the call that needed the model), and wires the
  dynamic batchers' `on_batch` to the batch-size histogram.
* `RegistryCollector`: at scrape time, reads the registry for models loaded by tier,
  memory used against the budget, and calls in flight per model.
* The data plane reports each stage once it is done (`waited`, `prefilled`, `decoded`,
  `scored`, `embedded`): a span timed from its `time.perf_counter()` marks plus the metrics.
  Spans cost nothing while tracing is off (see services/common/telemetry.py).

A generation cancelled by its caller reports its queue and prefill, not its decode.
"""

from __future__ import annotations

import asyncio
import time
import weakref

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from services.common import telemetry
from services.common.config import TIERS
from services.model_host.registry import ModelRecord, ModelRegistry, State

_tracer = telemetry.tracer("mirador.model_host")

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TOKEN_SECONDS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5)

LOADS = Counter("mirador_model_loads", "Models loaded into memory", ["model", "tier"])
LOAD_SECONDS = Histogram("mirador_model_load_seconds", "Time to load a model, seconds", ["model"], buckets=_SECONDS)
UNLOADS = Counter("mirador_model_unloads", "Models unloaded (evictions included)", ["model", "tier"])
EVICTIONS = Counter("mirador_model_evictions", "Models evicted to make room for another one", ["model", "tier"])
QUEUE_SECONDS = Histogram(
    "mirador_model_queue_seconds", "Time from a call's arrival to having its model in hand (waiting for a load included)",
    ["model", "operation"], buckets=(0.0005, 0.001, 0.005, *_SECONDS),
)
PREFILL_SECONDS = Histogram("mirador_model_prefill_seconds", "Prompt prefill (or Score/Embed forward pass) time, seconds",
                            ["model", "operation"], buckets=_SECONDS)
PROMPT_TOKENS = Counter("mirador_model_prompt_tokens", "Prompt tokens processed", ["model", "operation"])
GENERATED_TOKENS = Counter("mirador_model_generated_tokens", "Tokens generated", ["model"])
TIME_TO_FIRST_TOKEN = Histogram("mirador_model_time_to_first_token_seconds",
                                "Time from a Generate call's arrival to its first token, seconds", ["model"],
                                buckets=_SECONDS)
DECODE_TOKEN_SECONDS = Histogram("mirador_model_decode_seconds_per_token", "Mean decode time per generated token "
                                 "of one call, seconds", ["model"], buckets=_TOKEN_SECONDS)
DECODE_BATCH_SIZE = Histogram("mirador_model_decode_batch_size", "Sequences in one batched decode step (continuous "
                              "batching)", ["model"], buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64))
HEDGES = Counter("mirador_model_hedges", "Calls that joined a late call of another model (hedges), admitted or "
                 "refused because the host's cores were saturated (admission.py)", ["model", "outcome"])
PREFIX_TOKENS = Counter("mirador_model_prefix_cache_tokens", "Prompt tokens taken from a prefix cache instead of "
                        "prefilled again", ["model", "operation"])
BATCH_SIZE = Histogram("mirador_model_batch_size", "Items per dynamic batch (Embed)", ["model"],
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128))


class ObservabilityHook:
    """RegistryHook for metrics and load spans. Register it after the BatchingHook, so the
    batcher of a freshly loaded encoder exists when this hook sees the load."""

    def __init__(self, registry: ModelRegistry, batching=None):
        self.registry = registry
        self.batching = batching
        _COLLECTOR.watch(registry)

    def on_model_load(self, record: ModelRecord) -> None:
        LOADS.labels(record.name, record.spec.tier).inc()
        LOAD_SECONDS.labels(record.name).observe(record.load_ms / 1000)
        telemetry.record_span(_tracer, "model.load", time.perf_counter() - record.load_ms / 1000, {
            "mirador.model": record.name, "mirador.tier": record.spec.tier, "mirador.load_ms": round(record.load_ms, 1),
            "mirador.memory_bytes": record.measured_bytes,
            "mirador.execution_provider": record.runtime.execution_provider if record.runtime else "",
        })
        batcher = self.batching.batchers.get(record.name) if self.batching is not None else None
        if batcher is not None:
            batcher.on_batch = BATCH_SIZE.labels(record.name).observe

    def on_model_unload(self, record: ModelRecord) -> None:
        UNLOADS.labels(record.name, record.spec.tier).inc()
        if self._evicting(record):
            EVICTIONS.labels(record.name, record.spec.tier).inc()

    def _evicting(self, record: ModelRecord) -> bool:
        """An unload that runs inside another model's load is an eviction making room for it."""
        try:
            task = asyncio.current_task()
        except RuntimeError:  # no running loop
            return False
        return task is not None and any(
            r.load_task is task for r in self.registry.records.values() if r is not record
        )


class RegistryCollector:
    """Gauges read from the registry when Prometheus scrapes."""

    def __init__(self):
        self._registry: weakref.ReferenceType[ModelRegistry] | None = None

    def watch(self, registry: ModelRegistry) -> None:
        self._registry = weakref.ref(registry)

    def collect(self):
        registry = self._registry() if self._registry is not None else None
        if registry is None:
            return
        records = list(registry.records.values())
        loaded = GaugeMetricFamily("mirador_models_loaded", "Models in memory, by tier", labels=["tier"])
        for tier in TIERS:
            loaded.add_metric([tier], sum(1 for r in records if r.state == State.READY and r.spec.tier == tier))
        yield loaded
        memory = GaugeMetricFamily("mirador_model_memory_bytes", "Resident memory measured at load, per loaded model",
                                   labels=["model"])
        in_flight = GaugeMetricFamily("mirador_model_requests_in_flight", "Calls holding a loaded model now",
                                      labels=["model"])
        for r in records:
            if r.state == State.READY:
                memory.add_metric([r.name], r.loaded_bytes)
            in_flight.add_metric([r.name], r.in_flight)
        yield memory
        yield in_flight
        heads = CounterMetricFamily(
            "mirador_model_head_embeddings", "Pooled embeddings the classifier heads of an encoder asked for: computed, "
            "or reused (another head's call had the same text); since the encoder's load", labels=["encoder", "result"])
        for r in records:
            cache = getattr(r.runtime, "head_cache", None) if r.state == State.READY else None
            if cache is not None and (cache.hits or cache.misses):
                heads.add_metric([r.name, "computed"], cache.misses)
                heads.add_metric([r.name, "reused"], cache.hits)
        yield heads
        yield GaugeMetricFamily("mirador_model_host_memory_used_bytes", "Memory held by loaded models (the budget's use)",
                                value=registry.used_bytes)
        if registry.budget_bytes:
            yield GaugeMetricFamily("mirador_model_host_memory_budget_bytes",
                                    "services.model_host.memory_budget_mb in bytes", value=registry.budget_bytes)


_COLLECTOR = RegistryCollector()
REGISTRY.register(_COLLECTOR)


# --------------------------------------------------------------------------- data plane stages


def _span(name: str, started: float, ended: float | None = None, **attributes) -> None:
    telemetry.record_span(_tracer, name, started, {f"mirador.{k}": v for k, v in attributes.items()}, ended)


def waited(model: str, received: float, operation: str) -> None:
    """The call has its model (after queueing, and a load when it needed one)."""
    QUEUE_SECONDS.labels(model, operation).observe(time.perf_counter() - received)
    _span("queue", received, model=model, operation=operation)


def prefilled(model: str, started: float, tokens: int, ended: float | None = None) -> None:
    ended = time.perf_counter() if ended is None else ended
    PREFILL_SECONDS.labels(model, "generate").observe(ended - started)
    PROMPT_TOKENS.labels(model, "generate").inc(tokens)
    _span("prefill", started, ended, model=model, tokens=tokens)


def decode_step(model: str, batch_size: int) -> None:
    """One batched decode step of a decoder's engine, over `batch_size` sequences (engine thread)."""
    DECODE_BATCH_SIZE.labels(model).observe(batch_size)


def hedged(model: str, admitted: bool) -> None:
    HEDGES.labels(model, "admitted" if admitted else "refused").inc()


def prefix_reused(model: str, operation: str, tokens: int) -> None:
    """`tokens` of a prompt came from a prefix cache (`generate`: the engine's; `score`: Score's)."""
    PREFIX_TOKENS.labels(model, operation).inc(tokens)


def decoded(model: str, started: float, tokens: int, first_token_ms: float, finish_reason: str) -> None:
    elapsed = time.perf_counter() - started
    GENERATED_TOKENS.labels(model).inc(tokens)
    if tokens:
        DECODE_TOKEN_SECONDS.labels(model).observe(elapsed / tokens)
    if first_token_ms:
        TIME_TO_FIRST_TOKEN.labels(model).observe(first_token_ms / 1000)
    _span("decode", started, model=model, tokens=tokens, finish_reason=finish_reason)


def scored(model: str, started: float, tokens: int, options: int) -> None:
    PREFILL_SECONDS.labels(model, "score").observe(time.perf_counter() - started)
    PROMPT_TOKENS.labels(model, "score").inc(tokens)
    _span("score", started, model=model, tokens=tokens, options=options)


def embedded(model: str, started: float, texts: int) -> None:
    PREFILL_SECONDS.labels(model, "embed").observe(time.perf_counter() - started)
    _span("embed", started, model=model, texts=texts)

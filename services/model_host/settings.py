"""`services.model_host:` in the config."""

from __future__ import annotations

from dataclasses import dataclass, replace

from services.common.settings import ServiceSettings, choice, fraction, names, seconds, setting, whole


# When ONNX Runtime's idle intra-op threads spin instead of sleeping: never; between the operators of a
# run only (they sleep once it ends: session.force_spinning_stop); the same with the process's runs
# taking turns (run_turns.py); or always (ONNX Runtime's default).
SPINNING_MODES = ("off", "during_runs", "in_turn", "always")


def spinning_mode(reader, node, key: str) -> str | None:
    """`off`, `during_runs`, `in_turn` or `always`; true and false read as `always` and `off`."""
    value = reader.value(node)
    if isinstance(value, bool):
        return "always" if value else "off"
    return reader.string(node, key, choices=SPINNING_MODES)


@dataclass(frozen=True)
class ModelHostSettings(ServiceSettings):
    memory_budget_mb: int = setting(0, whole(0))  # 0 = no budget
    execution_providers: tuple[str, ...] = setting(("CPUExecutionProvider",), names)
    intra_op_threads: int = setting(0, whole(0))  # ONNX Runtime threads per session; 0 = one per core
    # When ONNX Runtime's idle worker threads spin instead of sleeping: `in_turn` (the default: between
    # the operators of a run, asleep once it ends, and the host's runs take turns: run_turns.py),
    # `during_runs` (the same without turns), `off` (false: never; sessions run side by side) or
    # `always` (true). One stream decodes ~1.3x faster in turn than off; sessions running at once
    # share the cores about as well as off, one run each (bench/thread_spinning.py measures the four).
    thread_spinning: str = setting("in_turn", spinning_mode)
    max_batch_size: int = setting(16, whole(1))  # dynamic batching of Embed calls; 1 = off
    max_queue_delay_ms: int = setting(2, whole(0))  # how long a batch waits for more calls
    # how often idle warm/cold models are checked against keep_alive
    reaper_interval_s: float = setting(1.0, seconds)
    replicas: int = setting(1, whole(1, 64))  # processes `mirador up` starts; replica i listens on port + i
    # Calls waiting for or running on one model; more get RESOURCE_EXHAUSTED at once
    # (a share is kept for routes with `priority: critical`, see services/model_host/admission.py).
    max_queue_per_model: int = setting(32, whole(1))
    # How long a load waits for calls on busy (unpinned) models to end when only they keep it out of
    # the memory budget; then RESOURCE_EXHAUSTED. 0 = refuse at once (the router tries another host).
    room_wait_s: float = setting(5.0, seconds)
    # Prompt tokens a decoder's engine prefills per iteration while other sequences decode: smaller
    # keeps their tokens flowing while a long prompt joins, larger prefills it sooner.
    prefill_chunk_tokens: int = setting(32, whole(1))
    # Which idle models a load evicts (services/model_host/tiering.py): `static`, the configured tiers
    # (cold before warm, least recently used first); `usage`, the most-used models become hot by
    # themselves (decayed call counts, half-life below; at least promote_after_calls of them; at most
    # promote_share of the budget) and one-off loads evict the least used first.
    tier_policy: str = setting("static", choice(("static", "usage")))
    usage_half_life_s: float = setting(600.0, seconds)
    promote_after_calls: int = setting(3, whole(1))
    promote_share: float = setting(0.75, fraction)
    # With placement across model hosts, where hot models are pinned (services/model_host/hot_placement.py):
    # `targets`, only on their placement targets (their first `copies` hosts in hash order) unless the
    # budget holds the whole fleet; `everywhere`, every hot model of this host's config.
    pin_hot: str = setting("targets", choice(("targets", "everywhere")))

    def replica(self, index: int) -> "ModelHostSettings":
        """The settings of replica `index` (0 = this one): the same, listening on port + index."""
        metrics_port = self.metrics_port + index if self.metrics_port else 0
        return replace(self, port=self.port + index, metrics_port=metrics_port, replicas=1)

    @property
    def replica_addresses(self) -> tuple[str, ...]:
        return tuple(self.replica(i).address for i in range(self.replicas))


SETTINGS = ModelHostSettings

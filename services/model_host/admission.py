"""Admission control: a bounded queue per model, so overload is refused at once
instead of piling up calls that time out.

Each model admits at most `services.model_host.max_queue_per_model` calls at a
time, counting those waiting for the model (its load, the inference threads) and
those running on it. A call beyond the limit gets RESOURCE_EXHAUSTED before any
work, naming the model and the limit; the caller (the router) may try a fallback
model or back off. Memory stays bounded: per model, at most the limit of calls
hold state.

Priorities: a share of each model's queue (`CRITICAL_SHARE`, at least one slot
when the limit is 2 or more) is kept for calls of routes with `priority: critical`
(the router marks them with the `x-mirador-priority: critical` metadata), so that
under a full queue critical calls are still admitted while normal ones are shed.

Everything runs on the server's event loop, so the counters need no lock.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

from services.common.errors import ResourceExhausted

PRIORITY_METADATA_KEY = "x-mirador-priority"
CRITICAL = "critical"
# Share of each model's queue that only critical calls may use.
CRITICAL_SHARE = 0.25


def reserved_for_critical(limit: int) -> int:
    return 0 if limit < 2 else max(1, math.floor(limit * CRITICAL_SHARE))


def priority_of(context) -> str:
    """The call's priority from its metadata: "critical" or "normal"."""
    try:
        metadata = context.invocation_metadata() or ()
    except Exception:  # noqa: BLE001 - a context without metadata is a normal call
        return "normal"
    for key, value in metadata:
        if key == PRIORITY_METADATA_KEY and value == CRITICAL:
            return CRITICAL
    return "normal"


class Admission:
    """Counts calls per model and refuses those beyond the model's queue limit."""

    def __init__(self, max_queue_per_model: int):
        self.limit = max_queue_per_model
        self.in_queue: dict[str, int] = {}  # only models with calls; empty entries are dropped
        self.rejected_total = 0

    def set_limit(self, max_queue_per_model: int) -> None:
        """A new limit (config reload); calls already admitted stay admitted."""
        self.limit = max_queue_per_model

    def _refuse(self, model: str, priority: str, held: int) -> None:
        self.rejected_total += 1
        reserved = reserved_for_critical(self.limit)
        if priority == CRITICAL or not reserved:
            raise ResourceExhausted(
                f"model `{model}` has {held} calls queued or running, its limit "
                f"(services.model_host.max_queue_per_model = {self.limit}); the host sheds this call instead of "
                "queueing it: retry with backoff, use another model, or raise the limit"
            )
        raise ResourceExhausted(
            f"model `{model}` has {held} calls queued or running; the last {reserved} of its "
            f"{self.limit} places (services.model_host.max_queue_per_model) are kept for critical routes, so this "
            "normal-priority call is shed: retry with backoff, use another model, or raise the limit"
        )

    @contextlib.contextmanager
    def admit(self, model: str, priority: str = "normal") -> Iterator[None]:
        """Holds one place in `model`'s queue for the block's duration, or raises ResourceExhausted."""
        held = self.in_queue.get(model, 0)
        allowed = self.limit if priority == CRITICAL else self.limit - reserved_for_critical(self.limit)
        if held >= allowed:
            self._refuse(model, priority, held)
        self.in_queue[model] = held + 1
        try:
            yield
        finally:
            left = self.in_queue.get(model, 1) - 1
            if left > 0:
                self.in_queue[model] = left
            else:
                self.in_queue.pop(model, None)

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

Hedges: a router that has waited long for a model's first answer asks the route's next model
too, and the first to answer answers (a hedge; it marks the call `x-mirador-hedge: late`). Sent
to another machine, a hedge cures a slow host; sent to the same host while its cores are
saturated, it runs beside the call it hedges and only takes turns from it (the same request
computed twice, exactly when the host has least to spare). So where the host knows how busy its
cores are (`thread_spinning: in_turn`: every session run takes a turn), a hedge is refused with
RESOURCE_EXHAUSTED while runs held the turn more than HEDGE_BUSY_SHARE of the last seconds; the
router then waits for the call it hedged. A hedge to an idle host (the first model stuck, not the
cores) is admitted as before.

Everything runs on the server's event loop, so the counters need no lock.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator

from services.common.call_marks import CRITICAL, HEDGE, HEDGE_METADATA_KEY, PRIORITY_METADATA_KEY
from services.common.errors import ResourceExhausted

# Above this busy share of the cores, a hedge would only slow the call it hedges: refused.
HEDGE_BUSY_SHARE = 0.8
# Share of each model's queue that only critical calls may use.
CRITICAL_SHARE = 0.25


def reserved_for_critical(limit: int) -> int:
    return 0 if limit < 2 else max(1, math.floor(limit * CRITICAL_SHARE))


def _marked(context, key: str, value: str) -> bool:
    """Whether the call's metadata has `key: value` (a context without metadata has no marks)."""
    try:
        metadata = context.invocation_metadata() or ()
    except Exception:  # noqa: BLE001 - no metadata: no marks
        return False
    return (key, value) in tuple(metadata)


def priority_of(context) -> str:
    """The call's priority from its metadata: "critical" or "normal"."""
    return CRITICAL if _marked(context, PRIORITY_METADATA_KEY, CRITICAL) else "normal"


def is_hedge(context) -> bool:
    """Whether the caller marked the call as a hedge of a late one."""
    return _marked(context, HEDGE_METADATA_KEY, HEDGE)


class Admission:
    """Counts calls per model and refuses those beyond the model's queue limit, and hedges while
    the cores are saturated (`busy_share`: the share of the last seconds the host's cores ran
    models; None where the host cannot tell, and every hedge is admitted)."""

    def __init__(self, max_queue_per_model: int, busy_share: Callable[[], float] | None = None,
                 on_hedge: Callable[[str, bool], None] | None = None):
        self.limit = max_queue_per_model
        self.busy_share = busy_share
        self.on_hedge = on_hedge  # (model, admitted): the metrics
        self.in_queue: dict[str, int] = {}  # only models with calls; empty entries are dropped
        self.rejected_total = 0
        self.hedges_refused_total = 0

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
    def admit(self, model: str, priority: str = "normal", hedge: bool = False) -> Iterator[None]:
        """Holds one place in `model`'s queue for the block's duration, or raises ResourceExhausted."""
        busy = self.busy_share() if hedge and self.busy_share is not None else 0.0
        if hedge and self.on_hedge is not None:
            self.on_hedge(model, busy <= HEDGE_BUSY_SHARE)
        if busy > HEDGE_BUSY_SHARE:
            self.rejected_total += 1
            self.hedges_refused_total += 1
            raise ResourceExhausted(
                f"model `{model}` was asked to join a late call, and this host's cores ran models {busy:.0%} of "
                "the last seconds: a second answer here would only slow the first; wait for the call it hedges"
            )
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

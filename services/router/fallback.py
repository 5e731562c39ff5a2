"""Which model answers: the primary, then each fallback, skipping models whose
circuit breaker is open.

A breaker opens after `failure_threshold` consecutive failures, so requests stop
paying for dead attempts; after `cooldown_s` it lets one probe through
(half-open): success closes it, failure opens it again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import grpc

# Failures that say "this model cannot answer now": another model may.
# Errors in the request itself (INVALID_ARGUMENT, NOT_FOUND...) are the caller's and are not retried.
RETRYABLE = frozenset({
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.ABORTED,
})


class BreakerState:
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass
class CircuitBreaker:
    failure_threshold: int = 3
    cooldown_s: float = 10.0
    clock: Callable[[], float] = time.monotonic
    state: str = BreakerState.CLOSED
    failures: int = 0
    opened_at: float = 0.0
    probe_in_flight: bool = False

    def allow(self) -> bool:
        """Whether a call may go to this model now (claims the probe when half-open)."""
        if self.state == BreakerState.OPEN and self.clock() - self.opened_at >= self.cooldown_s:
            self.state = BreakerState.HALF_OPEN
        if self.state == BreakerState.CLOSED:
            return True
        if self.state == BreakerState.HALF_OPEN and not self.probe_in_flight:
            self.probe_in_flight = True
            return True
        return False

    def record_success(self) -> None:
        self.state, self.failures, self.probe_in_flight = BreakerState.CLOSED, 0, False

    def record_failure(self) -> None:
        self.failures += 1
        self.probe_in_flight = False
        if self.state == BreakerState.HALF_OPEN or self.failures >= self.failure_threshold:
            self.state, self.opened_at = BreakerState.OPEN, self.clock()

    def release(self) -> None:
        """A call that ended for the caller's reasons (cancel, bad input) tells nothing about the model."""
        self.probe_in_flight = False


@dataclass
class Breakers:
    failure_threshold: int = 3
    cooldown_s: float = 10.0
    clock: Callable[[], float] = time.monotonic
    by_model: dict[str, CircuitBreaker] = field(default_factory=dict)

    def __getitem__(self, model: str) -> CircuitBreaker:
        if model not in self.by_model:
            self.by_model[model] = CircuitBreaker(self.failure_threshold, self.cooldown_s, self.clock)
        return self.by_model[model]

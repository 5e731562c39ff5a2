"""Per-client rate limits at the router: a token bucket per client.

    services:
      router:
        rate_limit_per_client: 20   # requests per second, sustained; 0 = no limit
        rate_limit_burst: 40        # bucket size; 0 = one second's worth (max(1, rate))

A client is the value of its `x-mirador-client` metadata, else its peer IP address
(without the port, so reconnecting does not reset a bucket). A call that finds its
client's bucket empty gets RESOURCE_EXHAUSTED naming the limit and when a token
will be there again (also in the `retry-after-ms` trailing metadata).

Memory is bounded: at most `max_clients` buckets are kept; the least recently
seen client is forgotten first, which only hands it a full bucket again.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from services.common.errors import ResourceExhausted

CLIENT_METADATA_KEY = "x-mirador-client"
RETRY_AFTER_METADATA_KEY = "retry-after-ms"
MAX_CLIENTS = 10_000
MAX_CLIENT_ID_CHARS = 128


def client_of(context) -> str:
    """`x-mirador-client` metadata, else the peer's address without its port."""
    try:
        for key, value in context.invocation_metadata() or ():
            if key == CLIENT_METADATA_KEY and isinstance(value, str) and value.strip():
                return value.strip()[:MAX_CLIENT_ID_CHARS]
    except Exception:  # noqa: BLE001 - no metadata: fall back to the peer
        pass
    try:
        peer = context.peer() or ""
    except Exception:  # noqa: BLE001
        peer = ""
    # "ipv4:127.0.0.1:5432", "ipv6:[::1]:5432", "unix:/path"
    if peer.startswith(("ipv4:", "ipv6:")):
        return peer.partition(":")[2].rpartition(":")[0] or peer
    return peer or "unknown"


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    def __init__(self, rate_per_s: float, burst: int = 0, clock: Callable[[], float] = time.monotonic,
                 max_clients: int = MAX_CLIENTS):
        self.clock = clock
        self.max_clients = max_clients
        self.buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self.rejected_total = 0
        self.configure(rate_per_s, burst)

    @classmethod
    def from_settings(cls, settings) -> "RateLimiter":
        return cls(settings.rate_limit_per_client, settings.rate_limit_burst)

    def configure(self, rate_per_s: float, burst: int = 0) -> None:
        """Sets the limit (also on config reload); existing buckets keep their tokens, capped at the new burst."""
        self.rate = float(rate_per_s)
        self.burst = float(burst or max(1, math.ceil(self.rate)))
        for bucket in self.buckets.values():
            bucket.tokens = min(bucket.tokens, self.burst)

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def check(self, client: str) -> None:
        """Takes one token from `client`'s bucket, or raises ResourceExhausted saying when to retry."""
        if not self.enabled:
            return
        now = self.clock()
        bucket = self.buckets.pop(client, None)
        if bucket is None:
            bucket = _Bucket(self.burst, now)
        else:
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
            bucket.updated = now
        self.buckets[client] = bucket  # most recently seen last
        while len(self.buckets) > self.max_clients:
            self.buckets.popitem(last=False)
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return
        self.rejected_total += 1
        retry_after_s = (1.0 - bucket.tokens) / self.rate
        error = ResourceExhausted(
            f"client `{client}` is over its rate limit of {self.rate:g} requests/s (burst {self.burst:g}; "
            f"services.router.rate_limit_per_client); retry in {retry_after_s * 1000:.0f} ms"
        )
        error.retry_after_ms = max(1, math.ceil(retry_after_s * 1000))
        raise error

    def admit(self, context) -> None:
        """`check` for the caller of this call; on refusal also sets the `retry-after-ms` trailing metadata."""
        if not self.enabled:
            return
        try:
            self.check(client_of(context))
        except ResourceExhausted as error:
            try:
                context.set_trailing_metadata(((RETRY_AFTER_METADATA_KEY, str(error.retry_after_ms)),))
            except Exception:  # noqa: BLE001 - the message says it too
                pass
            raise

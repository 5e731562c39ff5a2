"""Per-client rate limits at the router: a token bucket per client.

    services:
      router:
        rate_limit_per_client: 20   # requests per second, sustained; 0 = no limit
        rate_limit_burst: 40        # bucket size; 0 = one second's worth (max(1, rate))

A client is the caller's identity (identity.py): its bearer token (or the client a token
holder names), else its peer IP address without the port. Never metadata a caller picks
without a token. A call that finds its
client's bucket empty gets RESOURCE_EXHAUSTED naming the limit and when a token
will be there again (also in the `retry-after-ms` trailing metadata).

Memory is bounded: at most `max_clients` buckets are kept; the least recently
seen client is forgotten first, which only hands it a full bucket again.

With `state.redis_url` the buckets live in Redis (`RedisRateLimiter`, one Lua script per
call), so N router replicas together admit the limit, not N times it.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from services.common.errors import ResourceExhausted, Unavailable
from services.router.identity import CallerIdentity
from services.router.redis_link import RedisDown, RedisLink

RETRY_AFTER_METADATA_KEY = "retry-after-ms"
MAX_CLIENTS = 10_000


def client_of(context) -> str:
    """The caller's identity without a bearer token: its peer address (identity.py)."""
    return CallerIdentity()(context)


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
        self._refuse(client, bucket.tokens)

    def _refuse(self, client: str, tokens: float) -> None:
        self.rejected_total += 1
        retry_after_s = (1.0 - tokens) / self.rate
        error = ResourceExhausted(
            f"client `{client}` is over its rate limit of {self.rate:g} requests/s (burst {self.burst:g}; "
            f"services.router.rate_limit_per_client); retry in {retry_after_s * 1000:.0f} ms"
        )
        error.retry_after_ms = max(1, math.ceil(retry_after_s * 1000))
        raise error

    def admit(self, context, client: str | None = None) -> None:
        """`check` for the caller of this call (`client`: its identity, else its peer address); on
        refusal also sets the `retry-after-ms` trailing metadata."""
        if not self.enabled:
            return
        try:
            self.check(client if client is not None else client_of(context))
        except ResourceExhausted as error:
            _retry_after(context, error)
            raise

    async def admit_async(self, context, client: str) -> None:
        """`admit`, for the servicer's event loop: in process it is a few arithmetic operations."""
        self.admit(context, client)


def _retry_after(context, error: ResourceExhausted) -> None:
    try:
        context.set_trailing_metadata(((RETRY_AFTER_METADATA_KEY, str(error.retry_after_ms)),))
    except Exception:  # noqa: BLE001 - the message says it too
        pass


# One token bucket per client in a Redis hash, taken from atomically by every router replica.
# Redis's own clock refills it (replicas' clocks may differ). Returns {taken (0/1), tokens left}
# (tokens as a string: Lua numbers come back as integers).
_TAKE = """
local rate, burst, ttl_ms = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1000000
local bucket = redis.call('HMGET', KEYS[1], 'tokens', 'updated')
local tokens, updated = tonumber(bucket[1]), tonumber(bucket[2])
if tokens == nil or updated == nil then
  tokens = burst
else
  tokens = math.min(burst, tokens + math.max(0, now - updated) * rate)
end
local taken = 0
if tokens >= 1 then
  tokens = tokens - 1
  taken = 1
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'updated', tostring(now))
redis.call('PEXPIRE', KEYS[1], ttl_ms)
return {taken, tostring(tokens)}
"""


class RedisRateLimiter(RateLimiter):
    """The same limits, kept in Redis (`state.redis_url`) so that they hold for all router
    replicas together. Redis unavailable: with `fail_open` (the default) calls are admitted,
    otherwise refused with UNAVAILABLE; counted and logged either way (redis_link.py)."""

    def __init__(self, link: RedisLink, rate_per_s: float, burst: int = 0, fail_open: bool = True):
        super().__init__(rate_per_s, burst)
        self.link = link
        self.fail_open = fail_open
        self._take = link.script(_TAKE)

    def check(self, client: str) -> None:
        if not self.enabled:
            return
        # Kept until the bucket would be full again (and a second more): an idle client's key goes away.
        ttl_ms = int((self.burst / self.rate + 1.0) * 1000)
        try:
            taken, tokens = self.link.call("rate_limit", lambda redis_client: self._take(
                keys=[self.link.key("ratelimit", client)], args=[repr(self.rate), repr(self.burst), ttl_ms],
                client=redis_client))
        except RedisDown as down:
            if self.fail_open:
                self.link.count_unavailable("rate_limit", "admitted")
                return
            self.link.count_unavailable("rate_limit", "refused")
            raise Unavailable(f"the router cannot check rate limits: {down}; state.rate_limit_without_redis is "
                              "`closed`, so calls are refused until Redis answers again; retry shortly") from None
        if int(taken):
            return
        self._refuse(client, float(tokens))

    async def admit_async(self, context, client: str) -> None:
        """`admit` with the Redis round trip on the link's threads, never on the event loop."""
        if not self.enabled:
            return
        try:
            await self.link.run(self.check, client)
        except ResourceExhausted as error:
            _retry_after(context, error)
            raise

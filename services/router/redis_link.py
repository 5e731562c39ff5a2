"""The router's connection to Redis (`state.redis_url`), shared by sessions and rate limits.

Redis is short-lived state: when it is down or slow the router keeps answering (sessions
without history, rate limits open or closed as `state.rate_limit_without_redis` says),
never crashes and never hangs. Every command has `state.redis_timeout_ms`; no command is
retried (the caller is waiting); after a failure Redis is skipped for `COOLDOWN_S`, so a
dead server costs one timeout per second, not one per call. Each call made without Redis
is counted in `mirador_state_redis_unavailable_total{use, outcome}`; going down and coming
back are logged once each.

The commands are synchronous (redis-py's client), so the router never runs them on its event
loop: `run` hands them to a small thread pool of this link's own, and a slow or hung Redis
holds one of those threads for at most `redis_timeout_ms` while the loop keeps serving
(health checks, calls without a session, streams in flight).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import redis
from prometheus_client import Counter
from redis.backoff import NoBackoff
from redis.retry import Retry

from services.common.config import ConfigError, ConfigProblem
from services.common.logs import log_event
from services.common.state_settings import StateSettings, redact_url

log = logging.getLogger("mirador.router.redis")
COOLDOWN_S = 1.0
# Threads that wait on Redis for the event loop. Each command is bounded by redis_timeout_ms and
# a failure skips Redis for COOLDOWN_S, so a few suffice; past them, calls queue for a thread.
REDIS_THREADS = 16

REDIS_UNAVAILABLE = Counter(
    "mirador_state_redis_unavailable",
    "Calls the router served without Redis (down, slow or refusing), by use and what it did instead",
    ["use", "outcome"],
)


class RedisDown(Exception):
    """Redis could not be used for this call (the reason is the message)."""


class RedisLink:
    def __init__(self, settings: StateSettings, clock: Callable[[], float] = time.monotonic):
        missing = settings.missing_url("redis_url")
        if missing:  # the router stops at start, naming the key (the config error's exit code)
            raise ConfigError([ConfigProblem(settings.source, settings.lines.get("redis_url", 0),
                                             settings.key_of("redis_url"), missing)])
        self.url = redact_url(settings.redis_url)
        self.prefix = settings.redis_prefix
        timeout_s = settings.redis_timeout_ms / 1000
        self.client = redis.Redis.from_url(
            settings.redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0), decode_responses=True, client_name="mirador-router",
        )
        self.clock = clock
        self._down_until = 0.0
        self._down_reason = ""
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=REDIS_THREADS, thread_name_prefix="redis")

    async def run(self, function: Callable[..., Any], *args: Any) -> Any:
        """`function(*args)` (which talks to Redis through `call`) on this link's threads, off the
        event loop. Context variables do not follow it there: return what the caller needs."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(function, *args))

    def submit(self, function: Callable[..., Any], *args: Any) -> None:
        """`function(*args)` on this link's threads, not waited for (rollout judging); its errors are logged."""
        def run() -> None:
            try:
                function(*args)
            except Exception as exc:  # noqa: BLE001 - a background job: log, never lose the thread
                log.error("background redis job failed", exc_info=exc)
        self._executor.submit(run)

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def script(self, source: str) -> Any:
        return self.client.register_script(source)

    def call(self, use: str, command: Callable[[redis.Redis], Any]) -> Any:
        """Runs `command(client)`; raises RedisDown when Redis cannot answer now."""
        if self.clock() < self._down_until:
            raise RedisDown(self._down_reason)
        try:
            result = command(self.client)
        except redis.RedisError as exc:
            reason = f"Redis at {self.url} is unavailable ({type(exc).__name__}: {exc})"
            with self._lock:
                was_up = not self._down_reason
                self._down_until = self.clock() + COOLDOWN_S
                self._down_reason = reason
            if was_up:
                log_event(log, "redis unavailable: serving without it", logging.WARNING, use=use, url=self.url,
                          error=f"{type(exc).__name__}: {exc}")
            raise RedisDown(reason) from None
        if self._down_reason:
            with self._lock:
                self._down_reason = ""
            log_event(log, "redis available again", url=self.url)
        return result

    @staticmethod
    def count_unavailable(use: str, outcome: str) -> None:
        REDIS_UNAVAILABLE.labels(use, outcome).inc()

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.client.close()

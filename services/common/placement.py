"""Which model host serves a call, when the model hosts hold different models (placement).

Its caller (the router; the consensus service for its members' calls: both use this module)
keeps a view of every model host — health, memory budget and use, which models are
READY there and what each takes to load — refreshed every REFRESH_S, at once after a call failed
there, and every DOWN_RETRY_S while a host is down. A call goes to a host that has its model READY (the least busy one, counting this
router's own calls since the last refresh). When none has it, the call goes to the model's
placement target, which loads it on demand:

* Rendezvous (highest-random-weight) hashing: every (model, host) pair gets a pseudo-random
  u in (0, 1) from a hash, and host h scores `-w_h / ln(u)`; the highest score is the target
  and the rest, in score order, are the model's next hosts. The scores of the other hosts do
  not depend on whether a host is there, so a host that dies or stops serving hands each of
  its models to that model's next host (no other model moves), and a host that joins takes
  only the models it now scores highest for — and only for new loads, since a model READY
  somewhere keeps being served there. With weights, host h wins a share w_h / Σw of the
  models (the `-w/ln(u)` form is the weighted HRW of Schindelhauer and Schomaker, 2005).
* The weight is the host's free memory (budget minus what its loaded models hold), so emptier
  hosts take more new models; a full host keeps a small weight (it can evict idle models), and
  a host whose budget less its pinned (hot) models is smaller than the model is no candidate at
  all: it would refuse the load (RESOURCE_EXHAUSTED), so the model goes to its next host in hash
  order, counted as a degraded placement. Hosts where the model fits without evicting anything
  come first, then those where it fits beside their pinned models and the loads under way (its
  size is what the hosts report it takes), so a load does not push out an idle model while
  another host has room.
* `copies` (per model in `fleet:`): while fewer hosts than that have the model READY, the
  next hosts in its order are asked to load it (`LoadModel`, in the background) while calls
  go to the copies that are READY. A busy model gets one more copy whenever every READY copy
  has `max_num_seqs` calls in flight (its slots full, calls queueing); calls prefer the first
  copies in the model's order, so the extra ones idle when the load passes and their hosts
  unload them after `keep_alive`. A placement that cannot be satisfied (fewer usable hosts
  than copies, or none that can hold the model) degrades to the hosts that can, and counts it.

A host that reports nonsense — negative sizes, a used total its models do not add up to, models
the router's fleet does not have — is left out, with a log line, until it reports sense again.
More loaded than its budget is not nonsense (pinned models and KV slots can measure more than
their estimates, a reload can shrink the budget): such a host has no free memory, that is all. Calls that fail
before their first answer (the host is down, busy, or its load failed) are sent to the next
host; so is a call still waiting for its first answer on a host that the refresh finds down
(hung: SIGSTOP, a network partition). Once a stream has begun, its host's failure is the
caller's, as with a single host.

Round robin over identical replicas (gRPC's `round_robin` or Envoy/HAProxy) remains the other
way, chosen with `services.router.model_host_balancing: round_robin` (see router/server.py and
consensus/server.py: the one key decides for both). The metrics keep their `mirador_router_` names in
both processes, so one dashboard reads either.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from mirador.v1 import model_host_pb2, model_host_pb2_grpc
from prometheus_client import Counter, Gauge

from services.common.channels import open_channel
from services.common.config import ModelSpec, SecurityConfig
from services.common.errors import ResourceExhausted, ServiceError, Unavailable
from services.common.logs import log_event
from services.common.placement_policy import (  # noqa: F401 - uses_placement is imported from here too
    HostView,
    choose,
    dns_name,
    nonsense,
    read_listing,
    resolve,
    uses_placement,
)

log = logging.getLogger("mirador.placement")

REFRESH_S = 2.0  # every host's health and models are read this often (and at once after a failure)
DOWN_RETRY_S = 0.5  # a host that is down is asked again this often (one probe at a time), so it is back soon
PROBE_TIMEOUT_S = 1.0  # a host that does not answer its health check and ListModels within this is down
# ... twice in a row, when it was usable (asked again DOWN_RETRY_S later): a host busy loading a big graph
# on a loaded machine can miss one probe, and counting it down sent its calls away and their models loaded
# elsewhere. A refused connection or NOT_SERVING counts at once.
PROBE_MISSES_TO_DOWN = 2
DNS_EVERY = 5  # a `dns:` target is resolved again every this many refreshes
MAX_ATTEMPTS = 3  # hosts one call is tried on before its first answer
NO_HOST_WAIT_S = 5.0  # a call that finds no usable host waits this long (within its deadline) for one
LOAD_TIMEOUT_S = 120.0  # a background LoadModel of an extra copy
# Sent to the next host when they come back before the call's first message. CANCELLED there is the
# host's doing (a caller's own cancel reaches this code as asyncio.CancelledError): a host stopping on
# SIGTERM cancels what it has not answered when its drain ends, and no part of an answer was sent.
RETRY_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED})
MODEL_HOST_SERVICE = model_host_pb2.DESCRIPTOR.services_by_name["ModelHost"].full_name

HOSTS = Gauge("mirador_router_model_hosts", "Model hosts the router knows, by state (usable, down, ignored)", ["state"])
DEGRADED = Counter("mirador_router_placement_degraded", "Placements that could not be met as asked, by model and why",
                   ["model", "reason"])
RETRIED = Counter("mirador_router_placement_retries", "Calls sent to another model host before their first answer",
                  ["model", "code"])


# --------------------------------------------------------------------------- the live view


@dataclass
class _Host:
    view: HostView
    channel: grpc.aio.Channel
    stub: model_host_pb2_grpc.ModelHostStub
    health: health_pb2_grpc.HealthStub
    down: asyncio.Event = field(default_factory=asyncio.Event)  # set while the host is not usable
    listed: bool = True  # still among the resolved targets
    missed: int = 0  # probes timed out in a row while it was usable


class ModelHosts:
    """Every model host, as one stub-like object the router calls: `Generate`, `Embed` and `Score`
    pick the host per call (see the module's docstring)."""

    def __init__(self, targets: Sequence[str], fleet: dict[str, ModelSpec], security: SecurityConfig | None = None,
                 refresh_s: float = REFRESH_S, channel_options: Sequence[tuple[str, object]] = ()):
        self.targets = tuple(targets)
        self.fleet = fleet
        self.security = security
        self.refresh_s = refresh_s
        self.channel_options = tuple(channel_options)
        self.hosts: dict[str, _Host] = {}
        self._refreshing: asyncio.Task | None = None
        self._urgent: dict[str, asyncio.Task] = {}  # refreshes of one host after a failed call
        self._loads: set[asyncio.Task] = set()
        self._shared_refresh: asyncio.Task | None = None
        self._rounds = 0
        self._logged: dict[str, str] = {}  # address -> the last problem logged (one line per change)

    # -- lifecycle

    async def start(self) -> None:
        await self._resolve()
        await self.refresh()
        self._refreshing = asyncio.create_task(self._keep_refreshing(), name="refresh model hosts")

    async def close(self) -> None:
        tasks = [t for t in (self._refreshing, self._shared_refresh, *self._urgent.values(), *self._loads)
                 if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for host in self.hosts.values():
            await host.channel.close()

    async def _keep_refreshing(self) -> None:
        while True:
            next_round = time.monotonic() + self.refresh_s
            while (left := next_round - time.monotonic()) > 0:
                await asyncio.sleep(min(DOWN_RETRY_S, left))
                for address, host in list(self.hosts.items()):
                    if host.listed and (not host.view.healthy or host.missed):
                        self.suspect(address)
            self._rounds += 1
            if self._rounds % DNS_EVERY == 0 and any(dns_name(t) for t in self.targets):
                await self._resolve()
            await self.refresh()

    async def _resolve(self) -> None:
        addresses = await resolve(self.targets)
        for address in addresses:
            if address not in self.hosts:
                channel = open_channel(self.security, address, aio=True, service="model_host",
                                       options=self.channel_options)
                self.hosts[address] = _Host(HostView(address), channel, model_host_pb2_grpc.ModelHostStub(channel),
                                            health_pb2_grpc.HealthStub(channel))
                self.hosts[address].down.set()
                if self._rounds:
                    log_event(log, "model host joined", address=address)
            self.hosts[address].listed = True
        for address, host in self.hosts.items():
            if address not in addresses and host.listed:
                host.listed = False
                log_event(log, "model host no longer resolved: no new calls go there", address=address)

    async def refresh(self) -> None:
        await asyncio.gather(*(self._refresh_host(h) for h in list(self.hosts.values())))
        views = [h.view for h in self.hosts.values()]
        HOSTS.labels("usable").set(sum(v.usable for v in views))
        HOSTS.labels("down").set(sum(not v.healthy for v in views))
        HOSTS.labels("ignored").set(sum(v.healthy and bool(v.problem) for v in views))

    async def _refresh_host(self, host: _Host) -> None:
        view = host.view
        started = time.monotonic()
        try:
            if not host.listed:
                raise _NotListed()
            health = await host.health.Check(health_pb2.HealthCheckRequest(service=MODEL_HOST_SERVICE),
                                             timeout=PROBE_TIMEOUT_S)
            if health.status != health_pb2.HealthCheckResponse.SERVING:
                raise _NotServing(health_pb2.HealthCheckResponse.ServingStatus.Name(health.status))
            listing = await host.stub.ListModels(model_host_pb2.ListModelsRequest(), timeout=PROBE_TIMEOUT_S)
        except (grpc.aio.AioRpcError, _NotServing, _NotListed) as exc:
            timed_out = isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            if timed_out and view.usable and host.missed + 1 < PROBE_MISSES_TO_DOWN:
                host.missed += 1  # asked again within DOWN_RETRY_S (_keep_refreshing) before it counts as down
                return
            host.missed = 0
            reason = (exc.code().name if isinstance(exc, grpc.aio.AioRpcError)
                      else "not resolved any more" if isinstance(exc, _NotListed) else str(exc))
            if view.healthy or view.refreshed_at == 0.0:
                log_event(log, "model host down: its models go to their next hosts", logging.WARNING,
                          address=view.address, reason=reason)
            view.healthy, view.refreshed_at = False, started
            host.down.set()
            return
        host.missed = 0
        problem = nonsense(listing, self.fleet)
        if problem != self._logged.get(view.address, ""):
            if problem:
                log_event(log, "model host ignored: its report makes no sense", logging.WARNING,
                          address=view.address, problem=problem)
            else:
                log_event(log, "model host reports sense again", address=view.address)
            self._logged[view.address] = problem
        if not view.healthy and not problem:
            log_event(log, "model host usable", address=view.address, budget_mb=round(listing.memory_budget_bytes / 2**20),
                      ready=[m.name for m in listing.models if m.ready])
        view.healthy, view.problem, view.refreshed_at = True, problem, started
        view.budget_bytes, view.used_bytes = listing.memory_budget_bytes, listing.memory_used_bytes
        view.models = read_listing(listing, self.fleet)
        # a load this router asked for stays expected until the host shows it (or for two rounds)
        view.expected = {m: at for m, at in view.expected.items()
                         if not (view.ready(m) or (m in view.models and view.models[m].loading))
                         and time.monotonic() - at < 2 * self.refresh_s + PROBE_TIMEOUT_S}
        if view.usable:
            host.down = asyncio.Event() if host.down.is_set() else host.down
        else:
            host.down.set()

    async def refresh_now(self) -> None:
        """Reads every host again now; callers at the same moment share one refresh."""
        if self._shared_refresh is None or self._shared_refresh.done():
            self._shared_refresh = asyncio.create_task(self.refresh(), name="refresh model hosts now")
        await asyncio.shield(self._shared_refresh)

    def suspect(self, address: str) -> None:
        """A call failed there: read that host again now (once at a time)."""
        host = self.hosts.get(address)
        if host is None or (address in self._urgent and not self._urgent[address].done()):
            return
        self._urgent[address] = asyncio.create_task(self._refresh_host(host), name=f"refresh {address}")

    # -- choosing

    @property
    def views(self) -> list[HostView]:
        return [h.view for h in self.hosts.values() if h.listed]

    def copies(self, model: str) -> int:
        spec = self.fleet.get(model)
        return spec.copies if spec is not None else 1

    def pick(self, model: str, exclude: frozenset[str] = frozenset()) -> _Host:
        spec = self.fleet.get(model)
        try:
            choice = choose(model, self.views, self.copies(model), exclude, busy_at=spec.max_num_seqs if spec else 0)
        except ResourceExhausted:
            DEGRADED.labels(model, "no host can hold it").inc()
            raise
        if choice.short_by:
            DEGRADED.labels(model, "fewer hosts than copies").inc()
        if choice.passed_over:
            DEGRADED.labels(model, "no room beside pinned models").inc()
            log_event(log, "model placed past hosts whose pinned models leave it no room", model=model,
                      address=choice.host.address, passed_over=[h.address for h in choice.passed_over])
        for extra in choice.load_also:
            self._load_copy(model, self.hosts[extra.address])
        host = self.hosts[choice.host.address]
        if not host.view.ready(model) and model not in host.view.expected:
            host.view.expected[model] = time.monotonic()
        return host

    def _load_copy(self, model: str, host: _Host) -> None:
        host.view.expected[model] = time.monotonic()
        log_event(log, "loading another copy", model=model, address=host.view.address, copies=self.copies(model))

        async def load() -> None:
            try:
                await host.stub.LoadModel(model_host_pb2.LoadModelRequest(model=model), timeout=LOAD_TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                host.view.expected.pop(model, None)
                DEGRADED.labels(model, "copy failed to load").inc()
                log_event(log, "another copy did not load", logging.WARNING, model=model, address=host.view.address,
                          code=exc.code().name, error=exc.details())

        task = asyncio.create_task(load(), name=f"load {model} on {host.view.address}")
        self._loads.add(task)
        task.add_done_callback(self._loads.discard)

    # -- the stub the servicer calls

    def Generate(self, request: model_host_pb2.GenerateRequest, timeout: float | None = None, metadata=None):
        return PlacedStream(self, request.model, lambda stub, t: stub.Generate(request, timeout=t, metadata=metadata),
                            timeout)

    async def Embed(self, request: model_host_pb2.EmbedRequest, timeout: float | None = None, metadata=None):
        return await self._unary(request.model, lambda stub, t: stub.Embed(request, timeout=t, metadata=metadata), timeout)

    async def Score(self, request: model_host_pb2.ScoreRequest, timeout: float | None = None, metadata=None):
        return await self._unary(request.model, lambda stub, t: stub.Score(request, timeout=t, metadata=metadata), timeout)

    async def _unary(self, model: str, send: Callable, timeout: float | None):
        stream = PlacedStream(self, model, send, timeout)
        try:
            return await stream.read()
        finally:
            stream.release()

    # -- for `mirador status` and logs

    def describe(self) -> list[dict]:
        return [{"address": v.address, "usable": v.usable, "problem": v.problem, "budget_mb": round(v.budget_bytes / 2**20),
                 "used_mb": round(v.used_bytes / 2**20), "ready": sorted(m for m, s in v.models.items() if s.ready)}
                for v in self.views]


class _NotServing(Exception):
    pass


class _NotListed(Exception):
    pass


class PlacedStream:
    """One call (a Generate stream, or a unary call read once), sent to the host `pick` chooses and,
    until its first answer, to the next host when that one fails or goes down. Reads like the
    grpc.aio call it wraps: `read()`, `cancel()`, `async for`."""

    def __init__(self, hosts: ModelHosts, model: str, send: Callable, timeout: float | None):
        self.hosts, self.model, self.send = hosts, model, send
        self.deadline = time.monotonic() + timeout if timeout is not None else None
        self.call = None
        self.host: _Host | None = None
        self.started = False  # the first answer arrived: no more retries
        self._counted = False

    def _time_left(self) -> float | None:
        return None if self.deadline is None else max(self.deadline - time.monotonic(), 0.001)

    def _place(self, tried: frozenset[str]) -> None:
        self.release()
        self.host = self.hosts.pick(self.model, tried)
        calls = self.host.view.calls_here
        calls[self.model] = calls.get(self.model, 0) + 1
        self._counted = True
        self.call = self.send(self.host.stub, self._time_left())

    def release(self) -> None:
        if self._counted and self.host is not None:
            self.host.view.calls_here[self.model] -= 1
            self._counted = False

    async def read(self):
        if self.started:
            return await self._read_on()
        tried: set[str] = set()
        for attempt in range(MAX_ATTEMPTS):
            try:
                self._place(frozenset(tried))
            except Unavailable:
                if attempt:
                    raise self._last_error from None
                await self._wait_for_a_host(frozenset(tried))
            except ServiceError as exc:  # no host (left) for it: the servicer falls back as from a host's refusal
                if attempt:
                    raise self._last_error from None
                raise _call_error(exc.code, exc.message) from None
            tried.add(self.host.view.address)
            try:
                first = await self._first(self.host)
            except grpc.aio.AioRpcError as exc:
                self._last_error = exc
                if exc.code() not in RETRY_CODES or (self.deadline is not None and time.monotonic() >= self.deadline):
                    self.release()
                    raise
                self.host.view.expected.pop(self.model, None)
                self.hosts.suspect(self.host.view.address)
                RETRIED.labels(self.model, exc.code().name).inc()
                log_event(log, "call sent to the next model host", model=self.model, failed=self.host.view.address,
                          code=exc.code().name, error=exc.details())
                continue
            except _HostWentDown:
                self._last_error = _call_error(grpc.StatusCode.UNAVAILABLE, f"model host {self.host.view.address} "
                                               f"stopped answering before `{self.model}` did")
                if self.deadline is not None and time.monotonic() >= self.deadline:
                    self.release()
                    raise self._last_error from None
                RETRIED.labels(self.model, "HOST_DOWN").inc()
                log_event(log, "call sent to the next model host", model=self.model, failed=self.host.view.address,
                          code="HOST_DOWN")
                continue
            except BaseException:
                self.cancel()
                raise
            self.started = True
            self.host.view.answered(self.model)
            if first is grpc.aio.EOF:
                self.release()
            return first
        self.release()
        raise self._last_error

    async def _wait_for_a_host(self, tried: frozenset[str]) -> None:
        """None was usable at the last look (all starting, or their probes slow under load): looks
        again every DOWN_RETRY_S for up to NO_HOST_WAIT_S, within the call's deadline, then gives up
        with the hosts' states."""
        give_up = time.monotonic() + NO_HOST_WAIT_S
        if self.deadline is not None:
            give_up = min(give_up, self.deadline - DOWN_RETRY_S)
        while True:
            await self.hosts.refresh_now()
            try:
                self._place(tried)
                return
            except Unavailable as exc:
                if time.monotonic() + DOWN_RETRY_S > give_up:
                    raise _call_error(exc.code, exc.message) from None
            except ServiceError as exc:
                raise _call_error(exc.code, exc.message) from None
            await asyncio.sleep(DOWN_RETRY_S)

    async def _first(self, host: _Host):
        """The call's first message, unless its host goes down first."""
        read = asyncio.ensure_future(self._read_once())
        went_down = asyncio.ensure_future(host.down.wait())
        try:
            done, _ = await asyncio.wait({read, went_down}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            read.cancel()
            went_down.cancel()
            raise
        went_down.cancel()
        if read in done:
            return read.result()
        read.cancel()
        self.call.cancel()
        with contextlib.suppress(BaseException):
            await read
        raise _HostWentDown()

    async def _read_once(self):
        if hasattr(self.call, "read"):
            return await self.call.read()
        return await self.call  # a unary call

    async def _read_on(self):
        try:
            message = await self.call.read()
        except BaseException:
            self.release()
            raise
        if message is grpc.aio.EOF:
            self.release()
        return message

    def cancel(self) -> bool:
        self.release()
        return self.call.cancel() if self.call is not None else False

    def __aiter__(self):
        return self._messages()

    async def _messages(self):
        while (message := await self.read()) is not grpc.aio.EOF:
            yield message


class _HostWentDown(Exception):
    pass


def _call_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    """An error that reads like a model host's own, so the servicer treats it the same (fallbacks)."""
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)

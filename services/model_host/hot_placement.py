"""Which hot models this host pins, when the model hosts hold different models (placement).

A host loads its hot models and never evicts them. With placement across several hosts, that put
a copy of every hot model on every host, taking the memory that placement shares out (and, with a
budget mostly pinned, leaving hosts unable to load what placement sends them). So a hot model is
pinned only on its placement targets: the first `copies` hosts of its rendezvous order
(services/common/placement_policy.py; the hash's order alone, the same in every host) over the
model hosts that are up. On the other hosts it acts as warm: loaded on demand, evicted and reaped
as usual. The router sends its calls to where it is READY, so hosts and router need not agree on
every detail.

The order is kept over the hosts that answer (`HotPins`): every PEER_PROBE_S the host resolves
`model_host_targets` again (a `dns:` name's records: a headless Service's pods) and asks each
other host for its health and ListModels.
* A target that dies or stops serving (PEER_DOWN_AFTER probes missed in a row, or NOT_SERVING)
  drops out of the order, so the next host in hash order is the target: it pins the model and
  loads it at once, without waiting for a call.
* A host that joins (answers, or appears among the records) takes the pins it is now a target
  of and loads them; the host that held one keeps it pinned until every new target reports it
  READY, then lets it go to warm there: still loaded and serving, reaped after its keep_alive
  once idle, so a busy model is never moved.
* A host not among the targets (yet) pins nothing. Behind a headless Service a starting pod is
  not among the records until its readiness probe passes (unless `publishNotReadyAddresses`), so
  it waits, looking again every probe, and pins what it is a target of once it finds itself.
  Hot models are still served there on demand, as warm ones. (It used to pin every hot model.)
* A peer that has never answered since this host started counts as up for PEER_START_GRACE_S
  (hosts of one fleet start together; the first up must not load everything), then as down.

A host pins every hot model when it has no other use for the memory: no budget, or a budget that
holds the whole fleet. `services.model_host.pin_hot: everywhere` pins every hot model of the
host's own config (hosts with a config file each, naming their own hot models).

A host finds itself among the targets by its port and an address it can bind (127.0.0.1:port in
tests, its pod IP among a headless Service's records).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from dataclasses import dataclass
from typing import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from mirador.v1 import model_host_pb2, model_host_pb2_grpc

from services.common.channels import open_channel
from services.common.config import MiradorConfig
from services.common.logs import log_event
from services.common.placement_policy import placement_targets, resolve, uses_placement
from services.model_host.registry import ModelRegistry, State

log = logging.getLogger("mirador.model_host.hot_placement")

PEER_PROBE_S = 1.0  # the other hosts are asked this often (and the targets resolved again)
PEER_TIMEOUT_S = 1.0  # a probe not answered within this is missed
PEER_DOWN_AFTER = 2  # probes missed in a row before a peer that answered counts as down
PEER_START_GRACE_S = 10.0  # a peer never heard from counts as up this long after this host starts
# a peer that was down is tried again soon, not after gRPC's growing reconnect backoff (up to 120 s)
PEER_CHANNEL_OPTIONS = (("grpc.initial_reconnect_backoff_ms", 250), ("grpc.min_reconnect_backoff_ms", 250),
                        ("grpc.max_reconnect_backoff_ms", 1000))
MODEL_HOST_SERVICE = model_host_pb2.DESCRIPTOR.services_by_name["ModelHost"].full_name


@dataclass
class _Peer:
    channel: grpc.aio.Channel
    health: health_pb2_grpc.HealthStub
    stub: model_host_pb2_grpc.ModelHostStub
    answered: bool = False  # answered a probe since this host started
    missed: int = 0  # probes missed in a row
    not_serving: bool = False  # said NOT_SERVING (draining): down at once
    ready: frozenset[str] = frozenset()  # models READY there at its last answer

    @property
    def up(self) -> bool:
        return not self.not_serving and self.missed < PEER_DOWN_AFTER


class HotPins:
    """Keeps this host's pins on the hot models it is a placement target of, over the hosts that
    are up (see the module's docstring). `config_of` gives the config in force (a reload changes it)."""

    def __init__(self, config_of: Callable[[], MiradorConfig], port: int, registry: ModelRegistry,
                 clock: Callable[[], float] = time.monotonic, bound_to: str = ""):
        self.config_of, self.port, self.registry, self.clock = config_of, port, registry, clock
        self.bound_to = bound_to  # the address this host listens on ("0.0.0.0": every address)
        self.started_at = clock()
        self.peers: dict[str, _Peer] = {}
        self._said = ""  # the last placement logged (one line per change)
        self._reloaded = True  # pins to apply although the set of models pinned elsewhere did not change
        self._loading: asyncio.Task | None = None
        self._running: asyncio.Task | None = None

    def start(self) -> None:
        self._running = asyncio.create_task(self._keep_placing(), name="keep hot pins on their targets")

    async def close(self) -> None:
        for task in (self._running, self._loading):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        for peer in self.peers.values():
            await peer.channel.close()

    async def _keep_placing(self) -> None:
        while True:
            with contextlib.suppress(Exception):  # a failed round must not end the watch; the next one tries again
                await self.update()
            await asyncio.sleep(PEER_PROBE_S)

    async def update(self, reloaded: bool = False) -> None:
        """Resolves the targets, asks the other hosts, and pins what this host is a target of now
        (`reloaded`: the tiers may have changed, so the pins are applied even when the set is the same)."""
        self._reloaded = self._reloaded or reloaded
        config = self.config_of()
        hot = {name: spec for name, spec in config.fleet.items() if spec.tier == "hot"}
        if not hot or config.services.model_host.pin_hot == "everywhere" or not uses_placement(config):
            return self._apply(set(), "")
        if self.registry.fleet_fits():
            return self._apply(set(), "every hot model pinned: this host's budget holds the whole fleet",
                               budget_mb=self.registry.budget_bytes // 2**20)
        addresses = await resolve(config.services.model_host_targets)
        mine = [a for a in addresses if is_own_address(a, self.port, self.bound_to)]
        if not mine:
            return self._apply(set(hot), "this host is not among the model-host targets (yet): it pins no hot model "
                                         "until it is, and serves them on demand", logging.WARNING,
                               port=self.port, targets=addresses)
        await self._probe([a for a in addresses if a not in mine], config)
        up = [a for a in addresses if a in mine or self._counts_up(a)]
        elsewhere = set()
        for name, spec in hot.items():
            targets = placement_targets(name, up, spec.copies)
            if set(targets) & set(mine):
                continue
            record = self.registry.record(name)
            holding = record.pinned and name not in self.registry.hot_elsewhere and record.state in (State.READY,
                                                                                                    State.LOADING)
            if holding and not all(name in self.peers[t].ready for t in targets):
                continue  # handed over only once every new target holds it READY
            elsewhere.add(name)
        self._apply(elsewhere, "hot models pinned on their placement targets only", address=mine[0],
                    hosts_up=up, pinned_here=sorted(set(hot) - elsewhere), pinned_elsewhere=sorted(elsewhere))

    def _counts_up(self, address: str) -> bool:
        peer = self.peers[address]
        if peer.answered:
            return peer.up
        return not peer.not_serving and self.clock() - self.started_at < PEER_START_GRACE_S

    async def _probe(self, addresses: list[str], config: MiradorConfig) -> None:
        for gone in [a for a in self.peers if a not in addresses]:  # no longer resolved (a pod gone): forgotten
            await self.peers.pop(gone).channel.close()
        for address in addresses:
            if address not in self.peers:
                channel = open_channel(config, address, aio=True, service="model_host", options=PEER_CHANNEL_OPTIONS)
                self.peers[address] = _Peer(channel, health_pb2_grpc.HealthStub(channel),
                                            model_host_pb2_grpc.ModelHostStub(channel))
        await asyncio.gather(*(self._probe_one(address, self.peers[address]) for address in addresses))

    async def _probe_one(self, address: str, peer: _Peer) -> None:
        was_up = peer.answered and peer.up
        try:
            health = await peer.health.Check(health_pb2.HealthCheckRequest(service=MODEL_HOST_SERVICE),
                                             timeout=PEER_TIMEOUT_S)
            peer.not_serving = health.status != health_pb2.HealthCheckResponse.SERVING
            if not peer.not_serving:
                listing = await peer.stub.ListModels(model_host_pb2.ListModelsRequest(), timeout=PEER_TIMEOUT_S)
                peer.ready = frozenset(m.name for m in listing.models if m.state == model_host_pb2.MODEL_STATE_READY)
                peer.answered, peer.missed = True, 0
        except grpc.aio.AioRpcError:
            peer.missed += 1
        if peer.answered and was_up != peer.up:
            log_event(log, "model host up: it takes its hot pins" if peer.up else
                      "model host down: its hot pins go to the next hosts", logging.INFO if peer.up else logging.WARNING,
                      peer=address)

    def _apply(self, elsewhere: set[str], said: str, level: int = logging.INFO, **fields) -> None:
        if elsewhere == self.registry.hot_elsewhere and not self._reloaded:
            return  # unchanged: pins are not recomputed (an encoder pinned for a head about to load keeps its pin)
        self._reloaded = False
        before = {name for name, r in self.registry.records.items() if r.pinned}
        self.registry.place_hot(elsewhere)
        line = f"{said} {sorted(elsewhere)}"
        if said and line != self._said:
            log_event(log, said, level, **fields)
        self._said = line
        gained = {name for name, r in self.registry.records.items() if r.pinned} - before
        if gained and (self._loading is None or self._loading.done()):
            # pinned here now (a target died, or this host joined): loaded at once, not at the next call
            self._loading = asyncio.create_task(self.registry.load_pinned(), name="load pinned models")


ANY_ADDRESS = ("", "0.0.0.0", "::", "[::]")


def is_own_address(address: str, port: int, bound_to: str = "") -> bool:
    """Whether `address` (host:port, [v6]:port) is this host listening on `port`: the port is
    ours and the host resolves to an address of this machine (one we can bind), or to `bound_to`
    when the host listens on that one address only (several hosts on one machine, one address each)."""
    host, _, target_port = address.rpartition(":")
    if not target_port.isdigit() or int(target_port) != port:
        return False
    try:
        records = socket.getaddrinfo(host.strip("[]"), None, type=socket.SOCK_DGRAM)
    except OSError:
        return False
    if bound_to not in ANY_ADDRESS:
        try:
            mine = {sockaddr[0] for *_, sockaddr in socket.getaddrinfo(bound_to.strip("[]"), None, type=socket.SOCK_DGRAM)}
        except OSError:
            return False
        return any(sockaddr[0] in mine for *_, sockaddr in records)
    return any(_bindable(family, sockaddr[0]) for family, _, _, _, sockaddr in records)


def _bindable(family: int, ip: str) -> bool:
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((ip, 0))
        except OSError:
            return False
    return True

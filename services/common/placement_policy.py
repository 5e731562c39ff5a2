"""Placement's policy, without network or threads: what the router knows of each model host
(`HostView`), how a host's report is read and when it is nonsense, the weighted rendezvous order
of hosts for a model, which host a call goes to and which load extra copies (`choose`), and how
`dns:` targets resolve. placement.py keeps the live view (polling the hosts) and the calls;
its docstring says why the policy is what it is. Tested without processes in
tests/test_placement.py."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import socket
from dataclasses import dataclass, field, replace
from typing import Iterable, Sequence

from mirador.v1 import model_host_pb2

from services.common.config import MiradorConfig, ModelSpec
from services.common.errors import ResourceExhausted, Unavailable
from services.common.logs import log_event

log = logging.getLogger("mirador.placement")

NEGATIVE = 1 << 63  # a uint64 this large is a negative number sent as unsigned
UNLIMITED_WEIGHT = float(1 << 40)  # a host without a budget (0) weighs like one with 1 TiB free
MIN_WEIGHT_SHARE = 0.02  # a full host still weighs this share of its budget: it can evict


def uses_placement(config: MiradorConfig) -> bool:
    """Placement unless `services.router.model_host_balancing` says round_robin; `auto` places
    models when there are several hosts or a dns: name to resolve (one host is just that host)."""
    balancing, targets = config.services.router.model_host_balancing, config.services.model_host_targets
    if balancing == "auto":
        return len(targets) > 1 or targets[0].startswith("dns:")
    return balancing == "placement"


# --------------------------------------------------------------------------- the view of one host


@dataclass(frozen=True)
class ModelOnHost:
    """One model as a host reported it."""

    state: int  # model_host_pb2.ModelState
    in_flight: int = 0
    memory_bytes: int = 0  # held now (READY)
    load_bytes: int = 0  # what a load takes (0 = unknown / not built)
    pinned: bool = False  # never evicted now (hot tier, or the encoder of a loaded head)
    tier: str = ""  # configured: hot, warm, cold
    promoted: bool = False  # usage-driven tiering treats it as hot now (still evictable)

    @property
    def ready(self) -> bool:
        return self.state == model_host_pb2.MODEL_STATE_READY

    @property
    def loading(self) -> bool:
        return self.state == model_host_pb2.MODEL_STATE_LOADING


@dataclass
class HostView:
    """What the router knows of one model host, from its last refresh."""

    address: str
    healthy: bool = False  # SERVING and answered ListModels at the last refresh
    problem: str = ""  # why it is left out although it answers (nonsense in its report); "" = none
    budget_bytes: int = 0  # 0 = unlimited
    used_bytes: int = 0
    models: dict[str, ModelOnHost] = field(default_factory=dict)
    refreshed_at: float = 0.0  # monotonic
    # models this router sent there to load since the refresh (so the next calls follow them)
    expected: dict[str, float] = field(default_factory=dict)
    # this router's calls in flight there, per model (between refreshes the host's own counts lag)
    calls_here: dict[str, int] = field(default_factory=dict)

    @property
    def usable(self) -> bool:
        return self.healthy and not self.problem

    def ready(self, model: str) -> bool:
        status = self.models.get(model)
        return status is not None and status.ready

    def loading(self, model: str) -> bool:
        status = self.models.get(model)
        return (status is not None and status.loading) or model in self.expected

    def in_flight(self, model: str) -> int:
        status = self.models.get(model)
        return (status.in_flight if status else 0) + self.calls_here.get(model, 0)

    def answered(self, model: str) -> None:
        """A call to `model` got its first answer there, so the model is loaded: a load this router
        sent is over, before the next refresh says so (else it would still count as queued there,
        and the next first load would go elsewhere to avoid a load that has ended)."""
        self.expected.pop(model, None)
        status = self.models.get(model)
        if status is not None and not status.ready:
            self.models[model] = replace(status, state=model_host_pb2.MODEL_STATE_READY, memory_bytes=status.load_bytes)
            self.used_bytes += status.load_bytes

    def _coming(self, but: str) -> list[ModelOnHost]:
        """The models other than `but` loading there, or sent there to load since the refresh."""
        return [status for name, status in self.models.items()
                if name != but and not status.ready and (status.loading or name in self.expected)]

    def coming_bytes(self, but: str = "") -> int:
        """What loads under way there (and those this router sent since the refresh) will take, other
        than `but`'s: a LOADING model is not in the host's used bytes yet."""
        return sum(status.load_bytes for status in self._coming(but))

    def loads_under_way(self, but: str = "") -> int:
        """How many loads other than `but`'s a new load there would wait for (a host loads one model
        at a time)."""
        return len(self._coming(but))

    def pinned_bytes(self, but: str = "") -> int:
        """What the host's pinned models (never evicted) hold, other than `but`."""
        return sum(status.memory_bytes for name, status in self.models.items()
                   if name != but and status.ready and status.pinned)

    @property
    def free_bytes(self) -> float:
        """The budget left, less what loads under way there will take (loaded bytes over the budget
        are possible: pinned models that measured more than their estimate, a shrunk budget)."""
        if not self.budget_bytes:
            return UNLIMITED_WEIGHT
        return max(self.budget_bytes - self.used_bytes - self.coming_bytes(), 0)

    def room_for(self, model: str) -> float:
        """What `model` could have there by evicting every idle model: the budget less the pinned
        models and the loads under way (a load finishes before the next begins, so those pass)."""
        if not self.budget_bytes:
            return UNLIMITED_WEIGHT
        return self.budget_bytes - self.pinned_bytes(model) - self.coming_bytes(model)

    def within_budget(self, size_bytes: int) -> bool:
        return not self.budget_bytes or not size_bytes or size_bytes <= self.budget_bytes

    def can_hold(self, size_bytes: int, model: str = "") -> bool:
        """Whether a load of `size_bytes` could ever succeed there: within the budget less what the
        pinned models hold (the host refuses a load that only pinned memory stands in the way of)."""
        return (not self.budget_bytes or not size_bytes
                or size_bytes <= self.budget_bytes - self.pinned_bytes(model))

    def weight(self) -> float:
        if not self.budget_bytes:
            return UNLIMITED_WEIGHT
        return max(self.free_bytes, self.budget_bytes * MIN_WEIGHT_SHARE, 1.0)


def nonsense(listing: model_host_pb2.ListModelsResponse, fleet: dict[str, ModelSpec]) -> str:
    """Why a host's ListModels cannot be believed, or "" when it can. More bytes loaded than the
    budget is believed: pinned (hot) models and KV slots can measure more than their estimates, and
    a reloaded config can shrink the budget below what is pinned. Negative sizes (a uint64 from a
    signed number) and a used total that is not what its models hold are not."""
    sizes = {"memory_budget_bytes": listing.memory_budget_bytes, "memory_used_bytes": listing.memory_used_bytes,
             **{f"{m.name}.memory_bytes": m.memory_bytes for m in listing.models},
             **{f"{m.name}.load_bytes": m.load_bytes for m in listing.models}}
    negative = [f"{key} {value - 2**64}" for key, value in sizes.items() if value >= NEGATIVE]
    if negative:
        return f"reports negative memory ({', '.join(negative[:3])})"
    held = sum(m.memory_bytes for m in listing.models)
    if held != listing.memory_used_bytes:
        return f"reports {listing.memory_used_bytes} bytes used, but its models hold {held}"
    phantom = sorted(m.name for m in listing.models if m.memory_bytes and m.state != model_host_pb2.MODEL_STATE_READY)
    if phantom:
        return f"reports memory held by models that are not loaded ({', '.join(phantom[:5])})"
    unknown = sorted(m.name for m in listing.models if m.name not in fleet)
    if unknown:
        return (f"reports models the router's fleet does not have ({', '.join(unknown[:5])}); "
                "is it running another config?")
    return ""


def read_listing(listing: model_host_pb2.ListModelsResponse, fleet: dict[str, ModelSpec]) -> dict[str, ModelOnHost]:
    return {m.name: ModelOnHost(state=m.state, in_flight=m.requests_in_flight, memory_bytes=m.memory_bytes,
                                load_bytes=m.load_bytes, pinned=m.pinned,
                                tier=TIER_NAMES.get(m.tier, ""), promoted=m.promoted)
            for m in listing.models}


TIER_NAMES = {model_host_pb2.MODEL_TIER_HOT: "hot", model_host_pb2.MODEL_TIER_WARM: "warm",
              model_host_pb2.MODEL_TIER_COLD: "cold"}


# --------------------------------------------------------------------------- choosing (pure)


def hash_unit(model: str, address: str) -> float:
    """A pseudo-random number in (0, 1), fixed for the pair (the same in every router process)."""
    digest = hashlib.blake2b(f"{model}\x00{address}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") + 0.5) / 2.0**64


def rendezvous_score(model: str, address: str, weight: float) -> float:
    return -weight / math.log(hash_unit(model, address))


def placement_order(model: str, hosts: Iterable[HostView], size_bytes: int = 0) -> list[HostView]:
    """The usable hosts that can hold `model` (beside their pinned models), best target first:
    weighted rendezvous hashing, among the hosts where it fits without evicting anything first,
    then those where it fits beside their pinned models and the loads under way (when its size is
    known), so a load does not push out an idle model while another host has room; and among
    those alike, the hosts with the fewest bytes (then loads) under way first, so a load queues
    behind as little as it can (a host loads one model at a time: in bench/fleet_scale.py a 114 MB
    model's first call took 2.2 s, 1.3 s of it waiting for another model's load; and when a host dies,
    its models' loads split across the others by what they will take, not by the hash)."""
    candidates = [h for h in hosts if h.usable and h.can_hold(size_bytes, model)]
    return sorted(candidates, key=lambda h: (bool(size_bytes) and h.free_bytes >= size_bytes,
                                             bool(size_bytes) and h.room_for(model) >= size_bytes,
                                             -h.coming_bytes(model), -h.loads_under_way(model),
                                             rendezvous_score(model, h.address, h.weight()), h.address), reverse=True)


def placement_targets(model: str, addresses: Sequence[str], copies: int = 1) -> list[str]:
    """`model`'s first `copies` hosts among `addresses` when all are usable and alike (the hash's
    order alone: where a fleet starting empty places it, and where its hot models are pinned)."""
    return [h.address for h in placement_order(model, [HostView(a, healthy=True) for a in addresses])[:copies]]


@dataclass(frozen=True)
class Choice:
    host: HostView  # where this call goes
    load_also: tuple[HostView, ...] = ()  # hosts to load another copy on, in the background
    short_by: int = 0  # copies asked for that no usable host can hold
    # hosts whose hash would have put a new load there before `host`, but whose pinned models leave no room
    passed_over: tuple[HostView, ...] = ()


def model_size(model: str, hosts: Iterable[HostView]) -> int:
    """What loading `model` takes, as the hosts report it (the largest report; 0 = unknown)."""
    return max((h.models[model].load_bytes for h in hosts if model in h.models), default=0)


def choose(model: str, hosts: Sequence[HostView], copies: int = 1, exclude: frozenset[str] = frozenset(),
           busy_at: int = 0) -> Choice:
    """Where a call for `model` goes: the least busy host that has it READY (between equally busy
    ones, the first in the model's order, so copies beyond the first get calls only under load and
    leave by their keep_alive when it passes), else its target. With `busy_at`, a model whose every
    READY copy has that many calls in flight (its slots full) asks for one more copy. Raises
    Unavailable when no host is usable, and ResourceExhausted (naming the sizes) when the model is
    larger than every usable host's budget."""
    # a host whose fleet lacks the model (an older config) would only answer NOT_FOUND
    usable = [h for h in hosts if h.usable and h.address not in exclude and (model in h.models or not h.models)]
    if not usable:
        def why(h: HostView) -> str:
            if not h.healthy:
                return "down"
            if h.problem:
                return f"ignored: {h.problem}"
            return "tried already" if h.address in exclude else f"its fleet has no `{model}`"

        hosts_said = ", ".join(f"{h.address} ({why(h)})" for h in hosts) or "none configured"
        raise Unavailable(f"no model host can take a call for `{model}` now; hosts: {hosts_said}")
    size = model_size(model, hosts)
    order = placement_order(model, usable, size)
    if not order:
        big_enough = [h for h in usable if h.within_budget(size)]
        if not big_enough:
            largest = max(usable, key=lambda h: h.budget_bytes)
            raise ResourceExhausted(
                f"model `{model}` needs {size / 2**20:.0f} MB, more than the memory budget of every model host "
                f"(the largest: {largest.budget_bytes / 2**20:.0f} MB at {largest.address}); raise "
                "services.model_host.memory_budget_mb or shrink the model (mirador quantize)")
        held = ", ".join(f"{h.address} ({h.budget_bytes / 2**20:.0f} MB budget, {h.pinned_bytes(model) / 2**20:.0f} MB "
                         "pinned)" for h in big_enough)
        raise ResourceExhausted(
            f"model `{model}` needs {size / 2**20:.0f} MB, and every model host whose budget could hold it has too "
            f"much of it pinned by hot models: {held}; make some of them warm (fleet.NAME.tier), raise "
            "services.model_host.memory_budget_mb or shrink the model (mirador quantize)")
    ready = [h for h in usable if h.ready(model)]
    holding = set(id(h) for h in ready)
    missing = max(copies - len(ready), 0)
    if ready:
        rank = {id(h): i for i, h in enumerate(order)}
        best = min(ready, key=lambda h: (h.in_flight(model), rank.get(id(h), len(order)), h.address))
        spare = [h for h in order if id(h) not in holding and not h.loading(model)]
        loading = sum(1 for h in order if id(h) not in holding and h.loading(model))
        short_by = max(missing - loading - len(spare), 0)  # configured copies no usable host can take
        if busy_at and best.in_flight(model) >= busy_at:
            missing = max(missing, 1)  # every copy is full: one more, while a host has room for it
        wanted = max(missing - loading, 0)
        return Choice(best, tuple(spare[:wanted]), short_by=short_by)
    loading = [h for h in order if h.loading(model)]
    target = loading[0] if loading else order[0]  # a load under way is shared, not started twice
    others = [h for h in order if h is not target and not h.loading(model)]
    wanted = max(copies - 1 - (len(loading) - 1 if loading else 0), 0)
    return Choice(target, tuple(others[:wanted]), short_by=max(wanted - len(others), 0),
                  passed_over=() if loading else _passed_over(model, usable, target, size))


def _passed_over(model: str, usable: Sequence[HostView], target: HostView, size: int) -> tuple[HostView, ...]:
    """The hosts that would have come before `target` had pinned memory not counted: their budget
    holds the model, their pinned models leave it no room, and their hash scores higher (a target
    where the model fits without evicting comes first either way)."""
    def score(h: HostView) -> float:
        return rendezvous_score(model, h.address, h.weight())

    if not size or target.free_bytes >= size:
        return ()
    return tuple(h for h in usable
                 if h.within_budget(size) and not h.can_hold(size, model) and score(h) > score(target))


# --------------------------------------------------------------------------- targets


def dns_name(target: str) -> tuple[str, int] | None:
    """(name, port) of a `dns:[//authority/]name:port` target, else None."""
    if not target.startswith("dns:"):
        return None
    rest = target[4:]
    if rest.startswith("//"):
        rest = rest[2:].partition("/")[2]
    name, _, port = rest.rpartition(":")
    return (name.strip("[]"), int(port)) if name and port.isdigit() else None


def dns_authority(target: str) -> tuple[str, int] | None:
    """(ip, port) of the DNS server a `dns://AUTHORITY/name:port` target names (as gRPC reads it; port
    53 by default), else None: the system's resolver answers."""
    if not target.startswith("dns://"):
        return None
    authority = target[len("dns://"):].partition("/")[0]
    if not authority:
        return None
    if authority.startswith("["):  # [v6]:port
        host, _, rest = authority[1:].partition("]")
        port = rest.lstrip(":")
    else:
        host, _, port = authority.partition(":")
    return host, int(port) if port.isdigit() else 53


def query_a_records(server: tuple[str, int], name: str, timeout_s: float = 1.0) -> list[str]:
    """The IPv4 addresses of `name` from the DNS server at `server` (one UDP query, RFC 1035), for a
    `dns:` target that names its server. Raises OSError when it does not answer or answers an error."""
    question = b"".join(len(label).to_bytes(1, "big") + label.encode("idna") for label in name.rstrip(".").split("."))
    query_id = int.from_bytes(os.urandom(2), "big")
    request = query_id.to_bytes(2, "big") + b"\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + question + b"\x00\x00\x01\x00\x01"
    family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout_s)
        sock.sendto(request, server)
        reply = sock.recv(4096)
    if len(reply) < 12 or int.from_bytes(reply[:2], "big") != query_id:
        raise OSError(f"DNS server {server[0]}:{server[1]} answered something else")
    rcode, answers = reply[3] & 0x0F, int.from_bytes(reply[6:8], "big")
    if rcode not in (0, 3):  # 3: no such name, an empty answer
        raise OSError(f"DNS server {server[0]}:{server[1]} answered error code {rcode} for {name}")
    at = 12 + len(question) + 1 + 4  # the question echoed: name, its end, type and class
    addresses = []
    for _ in range(answers):
        while reply[at] and reply[at] < 0xC0:  # a name: labels, ending in a zero or a pointer
            at += 1 + reply[at]
        at += 2 if reply[at] >= 0xC0 else 1
        rtype, length = int.from_bytes(reply[at:at + 2], "big"), int.from_bytes(reply[at + 8:at + 10], "big")
        if rtype == 1 and length == 4:
            addresses.append(socket.inet_ntoa(reply[at + 10:at + 14]))
        at += 10 + length
    return addresses


def address_of(family: int, ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}"


async def resolve(targets: Sequence[str]) -> list[str]:
    """The host addresses behind `targets`: `ip:port` and `host:port` as they are, every record of a
    `dns:` name (a Kubernetes headless Service lists one per pod). A name that does not resolve
    gives no address (logged): the other hosts still serve."""
    addresses: list[str] = []
    loop = asyncio.get_running_loop()
    for target in targets:
        named = dns_name(target)
        if named is None:
            addresses.append(target)
            continue
        name, port = named
        server = dns_authority(target)
        try:
            if server is not None:  # the target names its DNS server
                ips = await loop.run_in_executor(None, query_a_records, server, name)
                records = [(socket.AF_INET, 0, 0, "", (ip, port)) for ip in ips]
            else:
                records = await loop.getaddrinfo(name, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            log_event(log, "model-host name does not resolve", logging.WARNING, target=target, error=str(exc))
            continue
        for family, _, _, _, sockaddr in records:
            address = address_of(family, sockaddr[0], port)
            if address not in addresses:
                addresses.append(address)
    return addresses


def tier_shown(status: ModelOnHost) -> str:
    """How `mirador status` shows a model's tier on one host: its configured tier, `hot, promoted`
    where usage-driven tiering made it hot there, `pinned` for an encoder held by its heads, `hot,
    not pinned here` for a hot model loaded on a host that is not one of its placement targets."""
    if status.promoted:
        return "hot, promoted"
    if status.pinned and status.tier != "hot":
        return "pinned"
    if status.tier == "hot" and not status.pinned:
        return "hot, not pinned here"
    return status.tier or "?"


def hosts_table(views: Iterable[HostView]) -> list[str]:
    """Lines for `mirador status`: each host, its memory (pinned included) and the models in memory
    there, READY unless marked loading, each with its tier on that host."""
    lines = []
    for view in views:
        state = "usable" if view.usable else (f"ignored: {view.problem}" if view.healthy else "down")
        pinned = view.pinned_bytes()
        budget = f"{view.used_bytes / 2**20:.0f}/{view.budget_bytes / 2**20:.0f} MB" if view.budget_bytes else \
            f"{view.used_bytes / 2**20:.0f} MB (no budget)"
        if pinned:
            budget += f", {pinned / 2**20:.0f} pinned"
        models = ", ".join(f"{name} [{tier_shown(s)}{', loading' if s.loading else ''}]"
                           for name, s in sorted(view.models.items()) if s.ready or s.loading) or "-"
        lines.append(f"{view.address:<22} {state:<8} {budget:<24} {models}")
    return lines

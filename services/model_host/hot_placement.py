"""Which hot models this host pins, when the model hosts hold different models (placement).

A host loads its hot models at start and never evicts them. With placement across several hosts,
that put a copy of every hot model on every host, taking the memory that placement shares out
(and, with a budget mostly pinned, leaving hosts unable to load what placement sends them). So a
hot model is pinned only on its placement targets: the first `copies` hosts of its rendezvous
order over `model_host_targets` (services/common/placement_policy.py; a fleet starts empty, so
that is the hash's order alone, the same in every host). On the other hosts it acts as warm:
loaded on demand (when its targets are down, say), evicted and reaped as usual. The router sends
its calls to where it is READY, so the hosts and the router need not agree on every detail.

A host pins every hot model when it has no other use for the memory: no budget, or a budget that
holds the whole fleet. `services.model_host.pin_hot: everywhere` pins every hot model of the
host's own config (hosts with a config file each, naming their own hot models).

A host finds itself among the targets by its port and an address it can bind (127.0.0.1:port in
tests, its pod IP among a headless Service's records).
"""

from __future__ import annotations

import logging
import socket

from services.common.config import MiradorConfig
from services.common.logs import log_event
from services.common.placement_policy import placement_targets, resolve, uses_placement
from services.model_host.registry import ModelRegistry

log = logging.getLogger("mirador.model_host.hot_placement")


async def hot_models_elsewhere(config: MiradorConfig, port: int, registry: ModelRegistry) -> set[str]:
    """The hot models of `config` this host (listening on `port`) does not pin: those whose
    placement targets are other hosts. Empty when every hot model stays pinned here."""
    hot = {name: spec for name, spec in config.fleet.items() if spec.tier == "hot"}
    if not hot or config.services.model_host.pin_hot == "everywhere" or not uses_placement(config):
        return set()
    if registry.fleet_fits():
        log_event(log, "every hot model pinned: this host's budget holds the whole fleet",
                  budget_mb=registry.budget_bytes // 2**20)
        return set()
    addresses = await resolve(config.services.model_host_targets)
    mine = [a for a in addresses if is_own_address(a, port)]
    if not mine:
        log_event(log, "this host is not among the model-host targets: it pins every hot model", logging.WARNING,
                  port=port, targets=addresses)
        return set()
    elsewhere = {name for name, spec in hot.items() if not set(placement_targets(name, addresses, spec.copies)) & set(mine)}
    log_event(log, "hot models pinned on their placement targets only", address=mine[0],
              pinned_here=sorted(set(hot) - elsewhere), pinned_elsewhere=sorted(elsewhere))
    return elsewhere


def is_own_address(address: str, port: int) -> bool:
    """Whether `address` (host:port, [v6]:port) is this host listening on `port`: the port is
    ours and the host resolves to an address of this machine (one we can bind)."""
    host, _, target_port = address.rpartition(":")
    if not target_port.isdigit() or int(target_port) != port:
        return False
    try:
        records = socket.getaddrinfo(host.strip("[]"), None, type=socket.SOCK_DGRAM)
    except OSError:
        return False
    return any(_bindable(family, sockaddr[0]) for family, _, _, _, sockaddr in records)


def _bindable(family: int, ip: str) -> bool:
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((ip, 0))
        except OSError:
            return False
    return True


"""The one place where Mirador opens gRPC channels.

Every client — the router calling the model hosts, the CLI, the supervisor's health
checks — opens its channels here, so `security:` in the config applies to all of
them the same way:

* with `security.tls`, the channel is TLS, checks the server's certificate against
  `security.tls.ca` and presents this process's certificate (mutual TLS);
* with a bearer token (`security.auth`) and `service="router"`, every call carries
  `authorization: Bearer <token>`.

Without a `security:` section (or with `config=None`) channels are plaintext, as before.
"""

from __future__ import annotations

import json
from typing import Sequence

import grpc
from mirador.v1 import model_host_pb2

from services.common.config import MiradorConfig, SecurityConfig
from services.common.security import (
    TOKEN_PROTECTED_SERVICES,
    bearer_client_interceptors,
    channel_credentials,
    channel_options,
)


def _security(config: MiradorConfig | SecurityConfig | None) -> SecurityConfig:
    if config is None:
        return SecurityConfig()
    if isinstance(config, SecurityConfig):
        return config
    return config.security


# A peer that stops answering (hung, stopped, its machine gone without closing the connection) is
# noticed within KEEPALIVE_TIME_MS + KEEPALIVE_TIMEOUT_MS: its calls fail UNAVAILABLE and the
# channel reconnects, instead of every call waiting for its deadline. The servers accept these
# pings (services/common/server.py: server_options).
KEEPALIVE_TIME_MS = 10_000
KEEPALIVE_TIMEOUT_MS = 5_000
KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),  # an idle channel to a dead peer is found too
    ("grpc.http2.max_pings_without_data", 0),     # a long stream waiting for its next token still pings
    # grpcio 1.85 ends an unanswered ping after this, not after keepalive_timeout_ms (default 60 s)
    ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),
]


def _single_host(target: str) -> str | None:
    """The one host of an `ipv4:`/`ipv6:` address list whose addresses all share it, else None."""
    scheme, _, addresses = target.partition(":")
    if scheme not in ("ipv4", "ipv6") or not addresses:
        return None
    hosts = {address.rpartition(":")[0].strip("[]") for address in addresses.split(",")}
    return hosts.pop() if len(hosts) == 1 else None


def open_channel(
    config: MiradorConfig | SecurityConfig | None,
    target: str,
    *,
    aio: bool,
    service: str | None = None,
    options: Sequence[tuple[str, object]] = (),
) -> grpc.Channel | grpc.aio.Channel:
    """A channel to `target` with the config's TLS credentials; `service` names the Mirador
    service called there (`router` adds the bearer token when one is configured).
    `aio=True` gives a `grpc.aio.Channel` (for use inside a service), else a blocking one."""
    security = _security(config)
    options = [*KEEPALIVE_OPTIONS, *options, *channel_options(security.tls)]
    if security.tls is not None and not security.tls.server_name and (host := _single_host(target)):
        # An `ipv4:a:p1,a:p2` list (replicas) has no host name of its own to check certificates
        # against; when every address is the same host, that host is the name.
        options.append(("grpc.ssl_target_name_override", host))
    token = security.bearer_token if service in TOKEN_PROTECTED_SERVICES else None
    interceptors = bearer_client_interceptors(token, aio=aio) if token else []

    if aio:
        if security.tls is None:
            return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors or None)
        return grpc.aio.secure_channel(target, channel_credentials(security.tls), options=options,
                                       interceptors=interceptors or None)

    if security.tls is None:
        channel = grpc.insecure_channel(target, options=options)
    else:
        channel = grpc.secure_channel(target, channel_credentials(security.tls), options=options)
    return grpc.intercept_channel(channel, *interceptors) if interceptors else channel


def model_host_channel(targets: tuple[str, ...], security: SecurityConfig | None = None) -> grpc.aio.Channel:
    """One channel to the model hosts (the router's and the consensus service's). Several
    `ip:port` targets (or one `dns:///` name, which may resolve to several pods) are balanced per
    call with gRPC's round_robin policy, which sends nothing to a replica whose grpc.health.v1
    status for mirador.v1.ModelHost is not SERVING."""
    if len(targets) == 1 and not targets[0].startswith("dns:"):
        return open_channel(security, targets[0], aio=True, service="model_host")
    if len(targets) == 1:
        target = targets[0]
    else:
        scheme = "ipv6" if targets[0].startswith("[") else "ipv4"
        target = f"{scheme}:{','.join(targets)}"
    service = model_host_pb2.DESCRIPTOR.services_by_name["ModelHost"].full_name
    service_config = {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": service},
        # Idempotent calls that found a replica gone are sent again (round_robin picks the next one).
        "methodConfig": [{
            "name": [{"service": service, "method": "ListModels"}],
            "retryPolicy": {"maxAttempts": 3, "initialBackoff": "0.01s", "maxBackoff": "0.1s",
                            "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]},
        }],
    }
    return open_channel(security, target, aio=True, service="model_host",
                        options=[("grpc.service_config", json.dumps(service_config))])

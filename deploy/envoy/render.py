"""Renders the Envoy config that fronts Mirador's model-host replicas and router.

    python deploy/envoy/render.py [--config config/mirador.yaml] [--replicas 2] > envoy.yaml
    envoy -c envoy.yaml

What it sets up (see deploy/README.md):
- one h2c listener (gRPC without TLS); `/mirador.v1.ModelHost/*` goes to the
  model-host replicas, everything else (`/mirador.v1.Router/*`, health, reflection)
  to the router;
- HTTP/2 to the upstreams, round robin;
- Envoy's native gRPC health check (grpc.health.v1, service mirador.v1.ModelHost or
  mirador.v1.Router), with `no_traffic_interval` equal to the interval (Envoy's
  default checks an idle cluster only once a minute);
- retries on another host (previous_hosts predicate) for idempotent calls
  (ListModels): unavailable, cancelled, reset, connect-failure, refused-stream, with a
  per-try timeout; the other calls are retried only where the upstream provably did
  not see them (connect-failure, refused-stream);
- a circuit breaker whose `max_retries` is raised from Envoy's default of 3 (with
  more than 3 retries in flight at once Envoy would fail the rest without trying);
- outlier detection (passive: consecutive errors eject a host for a while);
- the admin interface on loopback only.

The tests import this file (`tests/test_load_balancing.py`), so what they measure
is exactly what this renders. deploy/envoy/envoy.yaml is its output for the
shipped config with 2 replicas; a test fails when it is stale.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # `python deploy/envoy/render.py` from anywhere

MODEL_HOST_SERVICE = "mirador.v1.ModelHost"
ROUTER_SERVICE = "mirador.v1.Router"
# Calls that change nothing and can be sent again to another replica.
IDEMPOTENT_MODEL_HOST_METHODS = ("ListModels",)

Address = tuple[str, int]


def _address(host: str, port: int) -> dict:
    return {"socket_address": {"address": host, "port_value": port}}


def _seconds(value: float) -> str:
    return f"{value:g}s"


def _previous_hosts() -> list[dict]:
    return [{
        "name": "envoy.retry_host_predicates.previous_hosts",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
        },
    }]


def _retry_policy(retry_on: str, retries: int, per_try_timeout_s: float | None) -> dict:
    policy = {
        "retry_on": retry_on,
        "num_retries": retries,
        "retry_host_predicate": _previous_hosts(),
        "host_selection_retry_max_attempts": 5,
        "retry_back_off": {"base_interval": "0.005s", "max_interval": "0.05s"},
    }
    if per_try_timeout_s:
        policy["per_try_timeout"] = _seconds(per_try_timeout_s)
    return policy


def _cluster(name: str, endpoints: list[Address], service_name: str, health_interval_s: float) -> dict:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "0.25s",
        "lb_policy": "ROUND_ROBIN",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {
                    "http2_protocol_options": {"connection_keepalive": {"interval": "10s", "timeout": "2s"}}
                },
            }
        },
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _address(h, p)}} for h, p in endpoints]}],
        },
        "health_checks": [{
            "timeout": _seconds(max(0.1, health_interval_s * 0.8)),
            "interval": _seconds(health_interval_s),
            # Envoy checks a cluster that has had no traffic only every 60 s by default:
            # a replica that comes back would stay "unhealthy" for up to a minute.
            "no_traffic_interval": _seconds(health_interval_s),
            "no_traffic_healthy_interval": _seconds(health_interval_s),
            "unhealthy_threshold": 2,
            "healthy_threshold": 1,
            "grpc_health_check": {"service_name": service_name},
        }],
        "outlier_detection": {
            "consecutive_5xx": 5,
            "consecutive_gateway_failure": 3,
            "split_external_local_origin_errors": True,
            "consecutive_local_origin_failure": 2,
            "interval": "1s",
            "base_ejection_time": "10s",
            "max_ejection_percent": 50,
        },
        "circuit_breakers": {
            # Envoy's default max_retries is 3 retries in flight per cluster: under
            # concurrent load a replica crash needs more than that at once.
            "thresholds": [{"priority": "DEFAULT", "max_retries": 256, "max_requests": 4096}],
        },
        # With 2 replicas and one down, 50% are healthy: Envoy's default panic threshold
        # (50%) would be at its edge. 0 = never send to hosts known to be down.
        "common_lb_config": {"healthy_panic_threshold": {"value": 0.0}},
    }


def envoy_config(
    model_hosts: list[Address],
    router: Address | list[Address] | None = None,
    listen: Address = ("127.0.0.1", 8080),
    admin: Address = ("127.0.0.1", 9901),
    health_interval_s: float = 1.0,
    per_try_timeout_s: float = 1.0,
    retries: int = 3,
) -> dict:
    """The whole Envoy bootstrap config as a dict. `router` is one address, or the addresses of
    router replicas (balanced round robin like the model hosts; they share their state: docs/state.md)."""
    if not model_hosts:
        raise ValueError("at least one model host is needed")
    model_host_routes = [
        {
            "match": {"path": f"/{MODEL_HOST_SERVICE}/{method}", "grpc": {}},
            "route": {
                "cluster": "model_host",
                "timeout": "10s",
                "retry_policy": _retry_policy(
                    "unavailable,cancelled,reset,connect-failure,refused-stream", retries, per_try_timeout_s
                ),
            },
        }
        for method in IDEMPOTENT_MODEL_HOST_METHODS
    ]
    model_host_routes.append({
        "match": {"prefix": f"/{MODEL_HOST_SERVICE}/"},
        # Streams (Generate) last as long as the client's deadline allows: no route timeout.
        "route": {"cluster": "model_host", "timeout": "0s",
                  "retry_policy": _retry_policy("connect-failure,refused-stream", retries, None)},
    })
    routes = model_host_routes
    clusters = [_cluster("model_host", model_hosts, MODEL_HOST_SERVICE, health_interval_s)]
    if router is not None:
        routes.append({
            "match": {"prefix": "/"},
            "route": {"cluster": "router", "timeout": "0s",
                      "retry_policy": _retry_policy("connect-failure,refused-stream", retries, None)},
        })
        routers = [router] if isinstance(router, tuple) else list(router)
        clusters.append(_cluster("router", routers, ROUTER_SERVICE, health_interval_s))
    http_connection_manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "mirador",
        "codec_type": "HTTP2",  # gRPC clients speak h2c with prior knowledge
        "http2_protocol_options": {"max_concurrent_streams": 1024},
        "route_config": {
            "name": "mirador",
            "virtual_hosts": [{"name": "mirador", "domains": ["*"], "routes": routes}],
        },
        "http_filters": [{
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
        }],
    }
    return {
        "admin": {"address": _address(*admin)},  # loopback only: the admin API can stop Envoy
        "static_resources": {
            "listeners": [{
                "name": "mirador_grpc",
                "address": _address(*listen),
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": http_connection_manager,
                }]}],
            }],
            "clusters": clusters,
        },
    }


def render(config: dict) -> str:
    return ("# Generated by deploy/envoy/render.py; edit that file and re-run it.\n"
            + yaml.safe_dump(config, sort_keys=False))


def from_mirador_config(path: str | None, replicas: int | None = None, **kwargs) -> dict:
    """The Envoy config for a Mirador config file: its model-host replicas and its router."""
    from services.common.config import load_config

    services = load_config(path).services
    host = services.model_host
    count = replicas or host.replicas
    return envoy_config([(host.host, host.port + i) for i in range(count)],
                        router=(services.router.host, services.router.port), **kwargs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="Mirador config (default: config/mirador.yaml)")
    parser.add_argument("--replicas", type=int, help="model-host replicas (default: services.model_host.replicas)")
    parser.add_argument("--listen-port", type=int, default=8080)
    parser.add_argument("--admin-port", type=int, default=9901)
    parser.add_argument("-o", "--output", help="write here instead of stdout")
    args = parser.parse_args(argv)
    text = render(from_mirador_config(args.config, args.replicas, listen=("127.0.0.1", args.listen_port),
                                      admin=("127.0.0.1", args.admin_port)))
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

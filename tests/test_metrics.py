"""Prometheus metrics from real service processes: /metrics over HTTP, and a real
Prometheus (Debian's `prometheus` package) scraping a service."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import pytest
from mirador.v1 import common_pb2, model_host_pb2, model_host_pb2_grpc, router_pb2, router_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from conftest import free_port, write_config
from services.cli.supervisor import Mesh
from services.common.config import ConfigError, load_config, parse_config
from services.common.model_repository import ModelRepository
from services.model_host.observability import EVICTIONS, ObservabilityHook
from test_registry import make_registry
from tiny_models import build_tiny_decoder, build_tiny_encoder

FLEET = """
fleet:
  tiny-lm: {task: text-generation, tier: hot}
  tiny-embed: {task: embedding, tier: hot}
routes:
  chat: {primary: tiny-lm, timeout_ms: 10000}
"""


REPO = Path(__file__).resolve().parent.parent


def page(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} from a /metrics page."""
    text = page(port)
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples, name: str, **labels) -> float:
    """The sum of `name` over the samples whose labels include `labels` (0 when none)."""
    return sum(v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items())


@pytest.fixture(scope="module")
def metered_mesh(tmp_path_factory):
    directory = tmp_path_factory.mktemp("metrics")
    repository = ModelRepository(directory / "models")
    build_tiny_decoder(repository, "tiny-lm")
    build_tiny_encoder(repository, "tiny-embed")
    ports = {"router": free_port(), "model_host": free_port(), "gateway": free_port()}
    extra = {name: f"metrics_port: {port}" for name, port in ports.items()}
    extra["model_host"] += "\nmemory_budget_mb: 4096"
    config = load_config(write_config(directory, service_extra=extra, body=FLEET))
    mesh = Mesh(config, log_dir=directory / "logs", services=("router", "model_host", "gateway"),
                env={"XDG_CACHE_HOME": str(directory / "cache")})
    try:
        mesh.start()
        yield mesh, ports, directory
    finally:
        mesh.stop()


def test_rpc_counter_moves_with_calls_and_counts_status_codes(metered_mesh):
    mesh, ports, _ = metered_mesh
    route_method = dict(service="router", method="mirador.v1.Router/Route")
    before = scrape(ports["router"])
    with grpc.insecure_channel(mesh.config.services.router.address) as channel:
        router = router_pb2_grpc.RouterStub(channel)
        for _ in range(3):
            router.Route(router_pb2.RouteRequest(text="hi", route="chat"), timeout=10)
        with pytest.raises(grpc.RpcError) as refused:
            router.Route(router_pb2.RouteRequest(text="hi", route="no-such-route"), timeout=10)
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    # An aborted call's status can reach the client a moment before the interceptor records it.
    deadline = time.monotonic() + 2
    after = scrape(ports["router"])
    while value(after, "mirador_rpc_requests_total", code="NOT_FOUND", **route_method) == \
            value(before, "mirador_rpc_requests_total", code="NOT_FOUND", **route_method) and time.monotonic() < deadline:
        time.sleep(0.05)
        after = scrape(ports["router"])
    ok = value(after, "mirador_rpc_requests_total", code="OK", **route_method)
    assert ok - value(before, "mirador_rpc_requests_total", code="OK", **route_method) == 3
    assert value(after, "mirador_rpc_requests_total", code="NOT_FOUND", **route_method) \
        - value(before, "mirador_rpc_requests_total", code="NOT_FOUND", **route_method) == 1
    assert value(after, "mirador_rpc_duration_seconds_count", **route_method) >= 4
    assert value(after, "mirador_rpc_in_flight", **route_method) == 0
    # Health checks (the supervisor polls them) are not counted.
    assert not any(n == "mirador_rpc_requests_total" and "grpc.health" in dict(ls)["method"] for n, ls in after)


def test_model_host_metrics_follow_generation_embedding_and_loads(metered_mesh):
    mesh, ports, _ = metered_mesh
    with grpc.insecure_channel(mesh.config.services.router.address) as channel:
        request = router_pb2.AskRequest(text="hello world", route="chat")
        request.sampling.max_tokens = 5
        tokens = sum(r.HasField("token") for r in router_pb2_grpc.RouterStub(channel).Ask(request, timeout=30))
    with grpc.insecure_channel(mesh.config.services.model_host.address) as channel:
        host = model_host_pb2_grpc.ModelHostStub(channel)
        host.Embed(model_host_pb2.EmbedRequest(model="tiny-embed", texts=["a b", "c"]), timeout=30)
        gen = model_host_pb2.GenerateRequest(model="tiny-lm", messages=[common_pb2.ChatMessage(
            role=common_pb2.ROLE_USER, content="hello")])
        gen.sampling.max_tokens = 3
        tokens += sum(r.HasField("token") for r in host.Generate(gen, timeout=30))

    host_metrics = scrape(ports["model_host"])
    assert value(host_metrics, "mirador_model_generated_tokens_total", model="tiny-lm") == tokens
    assert value(host_metrics, "mirador_model_time_to_first_token_seconds_count", model="tiny-lm") == 2
    assert value(host_metrics, "mirador_model_prefill_seconds_count", model="tiny-lm", operation="generate") == 2
    assert value(host_metrics, "mirador_model_prompt_tokens_total", model="tiny-lm") > 0
    # both chats begin with the model's system turn: the second took it from the engine's prefix cache
    assert value(host_metrics, "mirador_model_prefix_cache_tokens_total", model="tiny-lm", operation="generate") > 0
    assert value(host_metrics, "mirador_model_batch_size_count", model="tiny-embed") == 1
    assert value(host_metrics, "mirador_model_batch_size_sum", model="tiny-embed") == 2
    assert value(host_metrics, "mirador_model_loads_total", model="tiny-lm", tier="hot") == 1
    assert value(host_metrics, "mirador_model_load_seconds_count", model="tiny-embed") == 1
    assert value(host_metrics, "mirador_models_loaded", tier="hot") == 2
    assert value(host_metrics, "mirador_model_host_memory_used_bytes") > 0
    assert value(host_metrics, "mirador_model_requests_in_flight", model="tiny-lm") == 0
    assert value(host_metrics, "mirador_rpc_requests_total", service="model_host",
                 method="mirador.v1.ModelHost/Generate", code="OK") == 2

    router_metrics = scrape(ports["router"])
    assert value(router_metrics, "mirador_router_requests_total", route="chat", model="tiny-lm") >= 1
    assert value(router_metrics, "mirador_model_generated_tokens_total") == 0  # each process its own


def test_the_grafana_dashboard_uses_only_metrics_the_services_serve(metered_mesh):
    _, ports, _ = metered_mesh
    served: set[str] = set()
    for port in ports.values():
        for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", page(port), re.M):
            served |= {name, *(f"{name}{suffix}" for suffix in ("_bucket", "_sum", "_count") if kind == "histogram")}
    dashboard = json.loads((REPO / "deploy" / "grafana" / "mirador.json").read_text())
    expressions = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    expressions.append(dashboard["templating"]["list"][1]["query"]["query"])
    used = {name for expr in expressions for name in re.findall(r"\bmirador_[a-z_]+", expr)}
    assert len(used) >= 15
    assert used <= served, f"not served by any service: {sorted(used - served)}"


def test_evictions_are_told_apart_from_other_unloads():
    registry, _, clock = make_registry({"hot": "hot", "warm": "warm", "cold": "cold"},
                                       {"hot": 100, "warm": 100, "cold": 100}, budget_mb=250)
    registry.hooks.append(ObservabilityHook(registry))
    before = EVICTIONS.labels("warm", "warm")._value.get()

    async def scenario():
        await registry.ensure_loaded("warm")
        await registry.ensure_loaded("hot")
        await registry.ensure_loaded("cold")  # no room: evicts warm (idle, unpinned)
        await registry.unload("cold")  # asked for: not an eviction

    asyncio.run(scenario())
    assert EVICTIONS.labels("warm", "warm")._value.get() - before == 1
    assert EVICTIONS.labels("cold", "cold")._value.get() == 0


def test_metrics_ports_must_not_clash():
    fleet = "fleet:\n  m: {task: text-generation}\n"
    with pytest.raises(ConfigError) as clash:
        parse_config("services:\n  router: {port: 50051, metrics_port: 50061}\n  model_host: {port: 50061}\n" + fleet)
    assert "services.router.metrics_port: port 50061 is already used by services.model_host.port" in str(clash.value)
    with pytest.raises(ConfigError) as replicas:
        parse_config("services:\n  router: {port: 50051, metrics_port: 9162}\n"
                     "  model_host: {port: 50061, metrics_port: 9161, replicas: 2}\n" + fleet)
    assert "services.model_host.metrics_port: port 9162 is already used by services.router.metrics_port" \
        in str(replicas.value)
    config = parse_config("services:\n  model_host: {port: 50061, metrics_port: 9161, replicas: 3}\n" + fleet)
    assert [config.services.model_host.replica(i).metrics_port for i in range(3)] == [9161, 9162, 9163]
    assert load_config().services.router.metrics_port == 9151  # the default config serves metrics


def test_a_real_prometheus_scrapes_the_router(metered_mesh, tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("the `prometheus` binary is not installed (Debian: apt-get install prometheus)")
    mesh, ports, _ = metered_mesh
    with grpc.insecure_channel(mesh.config.services.router.address) as channel:
        router_pb2_grpc.RouterStub(channel).Route(router_pb2.RouteRequest(text="hi", route="chat"), timeout=10)
    web_port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: mirador-router\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{ports['router']}']}}]\n"
    )
    log = (tmp_path / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{web_port}", "--log.level=warn"],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        query = urllib.parse.urlencode({"query": 'sum(mirador_rpc_requests_total{job="mirador-router"})'})
        deadline, result = time.monotonic() + 60, []
        while time.monotonic() < deadline:
            assert process.poll() is None, (tmp_path / "prometheus.log").read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/api/v1/query?{query}", timeout=5) as response:
                    result = json.load(response)["data"]["result"]
            except OSError:
                result = []  # not listening yet
            if result and float(result[0]["value"][1]) > 0:
                break
            time.sleep(0.5)
        assert result and float(result[0]["value"][1]) > 0, f"no scrape seen: {result}"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()

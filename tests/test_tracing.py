"""Tracing across real processes: `mirador ask` → router → model host, exported over
OTLP/gRPC to a receiver this test runs on loopback (the OTLP collector service from
opentelemetry-proto), configured only by the standard OTEL_* variables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent import futures
from typing import Callable

import grpc
import pytest
from mirador.v1 import router_pb2, router_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from conftest import write_config
from services.cli.supervisor import Mesh
from services.common.config import load_config
from services.common.model_repository import ModelRepository
from services.common.telemetry import TRACE_ID_METADATA_KEY, requested_exporters
from tiny_models import build_tiny_decoder

FLEET = """
fleet:
  tiny-lm: {task: text-generation, tier: hot}
routes:
  chat: {primary: tiny-lm, timeout_ms: 10000}
"""
SERVER, CLIENT = 2, 3  # opentelemetry.proto.trace.v1.Span.SpanKind


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver that keeps every span with its service name."""

    def __init__(self):
        self.spans: list[dict] = []
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            for resource_spans in request.resource_spans:
                attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.spans.append({
                            "service": attributes.get("service.name", ""),
                            "name": span.name,
                            "kind": span.kind,
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent_id": span.parent_span_id.hex(),
                            "start": span.start_time_unix_nano,
                            "end": span.end_time_unix_nano,
                            "attributes": {a.key: _value(a.value) for a in span.attributes},
                        })
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace(self, trace_id: str) -> list[dict]:
        with self.lock:
            return [s for s in self.spans if s["trace_id"] == trace_id]

    def wait_for(self, trace_id: str, names: set[str], timeout_s: float = 20.0,
                 also: Callable[[list[dict]], bool] = lambda spans: True) -> list[dict]:
        """The trace's spans once every name (and whatever `also` asks) has arrived: each service
        exports on its own schedule, so one side of a hop can arrive before the other."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            spans = self.trace(trace_id)
            if names <= {s["name"] for s in spans} and also(spans):
                return spans
            time.sleep(0.1)
        seen = sorted({(s["service"], s["name"]) for s in self.trace(trace_id)})
        raise AssertionError(f"trace {trace_id}: missing {names - {s['name'] for s in self.trace(trace_id)}}; got {seen}")


def _value(value):
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


def tree(spans: list[dict]) -> str:
    """The trace as an indented tree, for failure messages and the log."""
    children: dict[str, list[dict]] = {}
    ids = {s["span_id"] for s in spans}
    for span in sorted(spans, key=lambda s: s["start"]):
        children.setdefault(span["parent_id"] if span["parent_id"] in ids else "", []).append(span)
    lines: list[str] = []

    def walk(parent: str, depth: int) -> None:
        for span in children.get(parent, []):
            attributes = {k: v for k, v in span["attributes"].items() if k.startswith("mirador.")}
            lines.append(f"{'  ' * depth}{span['name']}  [{span['service']}]  {(span['end'] - span['start']) / 1e6:.1f} ms"
                         + (f"  {attributes}" if attributes else ""))
            walk(span["span_id"], depth + 1)

    walk("", 0)
    return "\n".join(lines)


@pytest.fixture(scope="module")
def traced_mesh(tmp_path_factory):
    receiver = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(4), options=[("grpc.so_reuseport", 0)])
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()

    directory = tmp_path_factory.mktemp("tracing")
    build_tiny_decoder(ModelRepository(directory / "models"), "tiny-lm")
    env = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # ms: spans reach the receiver quickly
        "XDG_CACHE_HOME": str(directory / "cache"),
    }
    saved = {key: os.environ.get(key) for key in [*env, "OTEL_SERVICE_NAME", "OTEL_SDK_DISABLED"]}
    os.environ.update(env)  # the supervisor passes its environment to the services
    for key in ("OTEL_SERVICE_NAME", "OTEL_SDK_DISABLED"):
        os.environ.pop(key, None)
    mesh = Mesh(load_config(write_config(directory, body=FLEET)), log_dir=directory / "logs",
                services=("router", "model_host", "gateway"))
    try:
        mesh.start()
        yield mesh, receiver
    finally:
        mesh.stop()
        server.stop(0)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_exporters_follow_the_standard_variables():
    assert requested_exporters({}) == []
    assert requested_exporters({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}) == ["otlp"]
    assert requested_exporters({"OTEL_TRACES_EXPORTER": "otlp,console"}) == ["otlp", "console"]
    assert requested_exporters({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}) == []
    assert requested_exporters({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}) == []


def test_one_trace_from_mirador_ask_through_router_to_model_host(traced_mesh):
    mesh, receiver = traced_mesh
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "--config", str(mesh.config.path), "ask", "hello world",
         "--route", "chat", "--max-tokens", "6", "--json"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    events = json.loads(result.stdout)
    assert "summary" in events[-2]
    trace_id = events[-1]["trace"]["trace_id"]
    assert len(trace_id) == 32 and int(trace_id, 16)

    spans = receiver.wait_for(trace_id, {"mirador ask", "route", "queue", "prefill", "decode"})
    # The server spans come a little after their children (they end last): wait for both.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and sum(s["kind"] == SERVER for s in spans) < 2:
        time.sleep(0.1)
        spans = receiver.trace(trace_id)
    print(f"\ntrace {trace_id}:\n{tree(spans)}")
    by_id = {s["span_id"]: s for s in spans}

    def one(name: str, service: str, kind: int | None = None) -> dict:
        found = [s for s in spans if s["name"] == name and s["service"] == service and kind in (None, s["kind"])]
        assert len(found) == 1, f"{name} in {service}: {len(found)} spans\n{tree(spans)}"
        return found[0]

    def parent(span: dict) -> dict:
        assert span["parent_id"] in by_id, f"{span['name']} has no parent in the trace\n{tree(spans)}"
        return by_id[span["parent_id"]]

    cli = one("mirador ask", "mirador-cli")
    assert cli["parent_id"] == ""  # the root
    ask = one("/mirador.v1.Router/Ask", "mirador-router", SERVER)
    route = one("route", "mirador-router")
    generate_out = one("/mirador.v1.ModelHost/Generate", "mirador-router", CLIENT)
    generate_in = one("/mirador.v1.ModelHost/Generate", "mirador-model_host", SERVER)
    assert parent(ask) is cli
    assert parent(route) is ask and parent(generate_out) is ask
    assert parent(generate_in) is generate_out
    for name in ("queue", "prefill", "decode"):
        assert parent(one(name, "mirador-model_host")) is generate_in
    assert route["attributes"]["mirador.route"] == "chat" and route["attributes"]["mirador.model"] == "tiny-lm"
    prefill, decode = one("prefill", "mirador-model_host"), one("decode", "mirador-model_host")
    assert prefill["attributes"]["mirador.tokens"] > 0
    assert decode["attributes"]["mirador.tokens"] == len([e for e in events if "token" in e])
    assert prefill["end"] <= decode["start"] + 1_000_000  # decode follows prefill (1 ms of clock slack)


def test_the_trace_id_comes_back_in_trailing_metadata(traced_mesh):
    mesh, receiver = traced_mesh
    with grpc.insecure_channel(mesh.config.services.router.address) as channel:
        router = router_pb2_grpc.RouterStub(channel)
        request = router_pb2.AskRequest(text="hello", route="chat")
        request.sampling.max_tokens = 2
        call = router.Ask(request, timeout=30)
        assert any(r.HasField("summary") for r in call)
        trace_id = dict(call.trailing_metadata())[TRACE_ID_METADATA_KEY]
        # A client without tracing: the router starts the trace, the model host continues it.
        spans = receiver.wait_for(trace_id, {"/mirador.v1.Router/Ask", "decode"})
        assert [s["name"] for s in spans if s["parent_id"] == ""] == ["/mirador.v1.Router/Ask"]

        # Refused calls carry their trace id too, so an error can be looked up.
        with pytest.raises(grpc.RpcError) as refused:
            list(router.Ask(router_pb2.AskRequest(text="hello", route="no-such-route"), timeout=10))
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        failed_id = dict(refused.value.trailing_metadata())[TRACE_ID_METADATA_KEY]
        assert failed_id != trace_id
        failed = receiver.wait_for(failed_id, {"/mirador.v1.Router/Ask", "route"})
        assert {s["name"]: s for s in failed}["route"]["attributes"] == {}  # no decision to describe


def test_mirador_ask_prints_the_trace_id(traced_mesh):
    mesh, receiver = traced_mesh
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "--config", str(mesh.config.path), "ask", "hello", "--route", "chat",
         "--max-tokens", "2"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("[trace ") and last.endswith("]"), result.stdout
    receiver.wait_for(last[len("[trace "):-1], {"mirador ask", "/mirador.v1.Router/Ask", "decode"})


def test_a_traceparent_sent_to_the_http_gateway_continues_through_the_mesh(traced_mesh):
    """An HTTP client's W3C trace context: gateway span under the client's, the router's under the gateway's."""
    import httpx

    mesh, receiver = traced_mesh
    trace_id, client_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    reply = httpx.post(f"http://{mesh.config.services.gateway.address}/v1/chat/completions",
                       json={"model": "chat", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2},
                       headers={"traceparent": f"00-{trace_id}-{client_span}-01"}, timeout=60)
    assert reply.status_code == 200, reply.text
    assert reply.headers["x-mirador-trace-id"] == trace_id
    def router_server_span(s):
        return s["name"] == "/mirador.v1.Router/Ask" and s["service"] == "mirador-router" and s["kind"] == SERVER

    # the gateway's client span of the hop has the router's server span's name: wait for both sides
    spans = receiver.wait_for(trace_id, {"POST /v1/chat/completions", "/mirador.v1.Router/Ask", "decode"},
                              also=lambda spans: any(router_server_span(s) for s in spans))
    by_id = {s["span_id"]: s for s in spans}
    gateway = next(s for s in spans if s["name"] == "POST /v1/chat/completions")
    assert gateway["service"] == "mirador-gateway" and gateway["parent_id"] == client_span and gateway["kind"] == SERVER
    ask = next(s for s in spans if router_server_span(s))
    hop = by_id[ask["parent_id"]]  # the gateway's gRPC client span
    assert hop["service"] == "mirador-gateway" and hop["kind"] == CLIENT and hop["parent_id"] == gateway["span_id"]

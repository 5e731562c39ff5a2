"""Hot config reload with real processes: SIGHUP (and `mirador reload`) makes the router
apply new routes, fallbacks, thresholds and rate limits (re-learning the classifier when
examples change) and the model host new tiers, keep_alive, budget and queue limits; a
bad file is refused with its reason logged while the old config keeps serving; a
service with nothing reloadable says a restart is needed."""

import json
import os
import signal
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from mirador.v1 import model_host_pb2, model_host_pb2_grpc, router_pb2, router_pb2_grpc

from conftest import REPO, write_config
from services.cli.supervisor import Mesh
from services.common.config import load_config
from services.common.model_repository import ModelRepository
from tiny_models import build_tiny_decoder, build_tiny_encoder

GREETINGS = "[hello there, hi friend, good morning to you, hey how are you, greetings and salutations]"
NUMBERS = "[one two three four, count to ten please, the sum of 42 and 17, multiply 3 by 9, 1 2 3 4 5 6 7]"
BODY = """
fleet:
  tiny-lm: {{task: text-generation, tier: hot}}
  tiny-lm-b: {{task: text-generation, tier: warm, keep_alive: 5m}}
  tiny-embed: {{task: embedding, tier: hot}}
routes:
  greetings: {{primary: tiny-lm, examples: {greetings}}}
  numbers: {{primary: tiny-lm, examples: {numbers}}}
  chat: {{primary: tiny-lm}}
{extra}
"""
ROUTER = "embedding_model: tiny-embed\nmin_confidence: 0.0"


def body(greetings=GREETINGS, numbers=NUMBERS, extra="", tier_b="warm", keep_alive_b="5m"):
    text = BODY.format(greetings=greetings, numbers=numbers, extra=extra)
    return text.replace("tier: warm, keep_alive: 5m", f"tier: {tier_b}, keep_alive: {keep_alive_b}")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    directory = tmp_path_factory.mktemp("reload")
    repository = ModelRepository(directory / "models")
    build_tiny_decoder(repository, "tiny-lm")
    build_tiny_decoder(repository, "tiny-lm-b", seed=1)
    build_tiny_encoder(repository, "tiny-embed")
    saved = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(directory / "cache")
    path = write_config(directory, body=body(), service_extra={"router": ROUTER})
    mesh = Mesh(load_config(path), log_dir=directory / "logs", services=("router", "model_host", "quantizer"))
    mesh.original_config = path.read_text()
    try:
        mesh.start(timeout_s=60)
        yield mesh
    finally:
        mesh.stop()
        os.environ.pop("XDG_CACHE_HOME", None) if saved is None else os.environ.__setitem__("XDG_CACHE_HOME", saved)


def rewrite(mesh, service_extra=None, **changes):
    """Writes the mesh's config file again: its first version's ports, other routes/fleet/settings."""
    text = mesh.original_config
    head = text[: text.index("\nfleet:")]
    if service_extra:
        for service, lines in service_extra.items():
            marker = f"  {service}:\n    port: {getattr(mesh.config.services, service).port}\n"
            head = head.replace(marker, marker + "".join(f"    {line}\n" for line in lines.splitlines()))
    mesh.config.path.write_text(head + "\n" + body(**changes).lstrip("\n"))


def events(mesh, name):
    lines = mesh.processes[name].log_path.read_text(errors="replace").splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def wait_for(condition, timeout_s=30, what="condition"):
    deadline = time.monotonic() + timeout_s
    last_error = None
    while time.monotonic() < deadline:
        try:
            result = condition()
        except grpc.RpcError as exc:  # e.g. a route that is not there yet
            result, last_error = None, exc
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}; last error: {last_error}")


def hup(mesh, *names):
    for name in names:
        os.kill(mesh.processes[name].process.pid, signal.SIGHUP)


def count(mesh, name, event):
    return sum(1 for e in events(mesh, name) if e.get("event", "").startswith(event))


def route(mesh, text, explicit="", client="tests"):
    with grpc.insecure_channel(mesh.config.services.router.address) as channel:
        return router_pb2_grpc.RouterStub(channel).Route(
            router_pb2.RouteRequest(text=text, route=explicit), timeout=30, metadata=(("x-mirador-client", client),))


def models(mesh):
    with grpc.insecure_channel(mesh.config.services.model_host.address) as channel:
        listing = model_host_pb2_grpc.ModelHostStub(channel).ListModels(model_host_pb2.ListModelsRequest(), timeout=5)
    return {m.name: m for m in listing.models}


def serving(mesh, name):
    settings = getattr(mesh.config.services, name)
    with grpc.insecure_channel(settings.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return mesh.processes[name].process.poll() is None and reply.status == health_pb2.HealthCheckResponse.SERVING


def mirador(mesh, *args):
    return subprocess.run([sys.executable, "-m", "services.cli", "--config", str(mesh.config.path), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=60)


def test_mirador_reload_applies_routes_rate_limits_tiers_and_queue_limits(mesh):
    wait_for(lambda: route(mesh, "hello there").route == "greetings", what="routes learned")
    with pytest.raises(grpc.RpcError) as caught:
        route(mesh, "hi", explicit="extra")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert models(mesh)["tiny-lm-b"].tier == model_host_pb2.MODEL_TIER_WARM
    done = {name: count(mesh, name, "config reload done") for name in ("router", "model_host")}

    rewrite(mesh, extra="  extra: {primary: tiny-lm-b, fallback: tiny-lm, priority: critical}", tier_b="hot",
            service_extra={"router": "rate_limit_per_client: 1\nrate_limit_burst: 2",
                           "model_host": "max_queue_per_model: 7\nmemory_budget_mb: 4096"})
    result = mirador(mesh, "reload")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("SIGHUP sent") == 3  # router, model host, quantizer

    for name in ("router", "model_host"):
        wait_for(lambda: count(mesh, name, "config reload done") > done[name], what=f"{name} reloaded")
    decision = route(mesh, "hi", explicit="extra")  # a new route with its fallback
    assert decision.model == "tiny-lm-b" and list(decision.fallbacks) == ["tiny-lm"]
    route(mesh, "hi", explicit="chat", client="limited")  # the new rate limit: burst 2, then refused
    with pytest.raises(grpc.RpcError) as caught:
        route(mesh, "hi", explicit="chat", client="limited")
        route(mesh, "hi", explicit="chat", client="limited")
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "1 requests/s" in caught.value.details()
    # tiny-lm-b became hot: pinned and loaded without a call asking for it
    wait_for(lambda: models(mesh)["tiny-lm-b"].ready, what="tiny-lm-b loaded as hot")
    assert models(mesh)["tiny-lm-b"].tier == model_host_pb2.MODEL_TIER_HOT
    applied = [e for e in events(mesh, "model_host") if e.get("event") == "model settings applied"][-1]
    assert applied["models"] == ["tiny-lm-b"] and applied["max_queue_per_model"] == 7
    assert applied["memory_budget_mb"] == 4096
    # the quantizer has nothing reloadable: it says so and keeps serving
    wait_for(lambda: count(mesh, "quantizer", "config reloaded: restart needed for this service"),
             what="quantizer restart notice")
    assert all(serving(mesh, name) for name in ("router", "model_host", "quantizer"))


def test_changed_examples_are_learned_again_before_they_serve(mesh):
    wait_for(lambda: route(mesh, "hello there").route == "greetings", what="routes learned")
    done = count(mesh, "router", "routes applied")
    rewrite(mesh, greetings=NUMBERS, numbers=GREETINGS)  # swap the examples of the two routes
    hup(mesh, "router")
    wait_for(lambda: count(mesh, "router", "routes applied") > done, what="new routes applied")
    assert route(mesh, "hello there").route == "numbers"
    assert route(mesh, "count to ten please").route == "greetings"


def test_a_bad_file_is_refused_with_its_reason_and_the_old_config_keeps_serving(mesh):
    rewrite(mesh, extra="  extra: {primary: tiny-lm-b}")
    hup(mesh, "router")
    wait_for(lambda: route(mesh, "hi", explicit="extra"), what="extra route")
    rejected = count(mesh, "router", "config reload rejected")
    good = mesh.config.path.read_text()
    mesh.config.path.write_text(good.replace("extra: {primary: tiny-lm-b}", "extra: {primary: no-such-model}"))
    try:
        # `mirador reload` checks the file first and signals nobody
        result = mirador(mesh, "reload")
        assert result.returncode == 2 and "routes.extra.primary" in result.stderr and "no-such-model" in result.stderr
        hup(mesh, "router", "model_host")  # a plain SIGHUP reaches the services: they refuse the file
        for name in ("router", "model_host"):
            entry = wait_for(lambda: [e for e in events(mesh, name) if e.get("event", "").startswith("config reload rejected")],
                             what=f"{name} rejection")[-1]
            assert any("routes.extra.primary" in p and "no-such-model" in p for p in entry["problems"])
        assert count(mesh, "router", "config reload rejected") == rejected + 1
        mesh.config.path.write_text("services: [not, a, mapping\n")  # not even YAML
        hup(mesh, "router")
        wait_for(lambda: count(mesh, "router", "config reload rejected") == rejected + 2, what="YAML rejection")
        assert route(mesh, "hi", explicit="extra").model == "tiny-lm-b"  # the old config serves
        assert serving(mesh, "router") and serving(mesh, "model_host")
    finally:
        mesh.config.path.write_text(good)

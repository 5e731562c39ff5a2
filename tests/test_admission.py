"""Load shedding: a bounded queue per model at the model host (RESOURCE_EXHAUSTED at once
past it, a share kept for critical routes) and per-client rate limits at the router.
Units with fake clocks, then real processes with tiny models slowed by fault injection."""

import hashlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from mirador.v1 import common_pb2, model_host_pb2, model_host_pb2_grpc, router_pb2, router_pb2_grpc

from conftest import write_config
from services.cli.supervisor import Mesh
from services.common.config import ConfigError, load_config, parse_config
from services.common.errors import ResourceExhausted
from services.common.model_repository import ModelRepository
from services.model_host.admission import HEDGE_BUSY_SHARE, Admission, reserved_for_critical
from services.model_host.faults import ENV_VAR as DELAY_ENV
from services.router.identity import CallerIdentity
from services.router.rate_limit import RateLimiter, client_of
from tiny_models import build_tiny_decoder

# --------------------------------------------------------------------------- units


def test_admission_bounds_each_model_and_keeps_a_share_for_critical_calls():
    admission = Admission(4)  # 1 place kept for critical calls
    assert reserved_for_critical(4) == 1 and reserved_for_critical(1) == 0 and reserved_for_critical(32) == 8
    with admission.admit("m"), admission.admit("m"), admission.admit("m"):
        with pytest.raises(ResourceExhausted) as normal:
            with admission.admit("m"):
                pass
        assert "`m`" in normal.value.message and "max_queue_per_model" in normal.value.message
        assert "critical" in normal.value.message
        with admission.admit("m", "critical"):
            with pytest.raises(ResourceExhausted) as full:
                with admission.admit("m", "critical"):
                    pass
            assert "limit (services.model_host.max_queue_per_model = 4)" in full.value.message
        with admission.admit("other"):  # per model: another model has its own queue
            pass
    assert admission.in_queue == {}  # places are given back, and empty entries dropped (bounded memory)
    assert admission.rejected_total == 2


def test_admission_gives_the_place_back_when_the_call_fails():
    admission = Admission(1)
    with pytest.raises(ValueError):
        with admission.admit("m"):
            raise ValueError("boom")
    with admission.admit("m"):
        pass


def test_a_hedge_waits_while_the_cores_are_saturated_and_other_calls_do_not():
    busy = [0.95]
    admission = Admission(4, busy_share=lambda: busy[0])
    with pytest.raises(ResourceExhausted) as refused:
        with admission.admit("m", hedge=True):
            pass
    assert "`m` was asked to join a late call" in refused.value.message and "95%" in refused.value.message
    assert "wait for the call it hedges" in refused.value.message
    with admission.admit("m"):  # not a hedge: the queue decides, as before
        pass
    busy[0] = HEDGE_BUSY_SHARE - 0.1
    with admission.admit("m", hedge=True):  # the cores have room: the hedge may help
        pass
    with Admission(4).admit("m", hedge=True):  # a host that cannot tell admits every hedge
        pass
    assert (admission.hedges_refused_total, admission.rejected_total, admission.in_queue) == (1, 1, {})


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_token_bucket_allows_the_burst_then_the_rate_and_says_when_to_retry():
    clock = _Clock()
    limiter = RateLimiter(2.0, burst=3, clock=clock)
    for _ in range(3):
        limiter.check("a")
    with pytest.raises(ResourceExhausted) as caught:
        limiter.check("a")
    assert "client `a`" in caught.value.message and "2 requests/s" in caught.value.message
    assert "rate_limit_per_client" in caught.value.message and "retry in 500 ms" in caught.value.message
    assert caught.value.retry_after_ms == 500
    limiter.check("b")  # another client has its own bucket
    clock.now += 0.5  # one token back at 2/s
    limiter.check("a")
    with pytest.raises(ResourceExhausted):
        limiter.check("a")
    clock.now += 60  # refills up to the burst, not beyond
    for _ in range(3):
        limiter.check("a")
    with pytest.raises(ResourceExhausted):
        limiter.check("a")


def test_rate_limiter_is_off_at_zero_and_remembers_a_bounded_number_of_clients():
    off = RateLimiter(0.0)
    for _ in range(1000):
        off.check("a")
    limiter = RateLimiter(1.0, clock=_Clock(), max_clients=100)
    for i in range(1000):
        limiter.check(f"client-{i}")
    assert len(limiter.buckets) == 100 and "client-999" in limiter.buckets
    assert limiter.burst == 1  # default burst: one second's worth


class _Context:
    def __init__(self, metadata=(), peer="ipv4:10.1.2.3:45678"):
        self.metadata, self._peer = metadata, peer

    def invocation_metadata(self):
        return self.metadata

    def peer(self):
        return self._peer


def test_without_a_token_the_identity_is_the_peer_ip_and_metadata_is_not_believed():
    assert client_of(_Context((("x-mirador-client", "billing-batch"),))) == "10.1.2.3"
    assert client_of(_Context()) == "10.1.2.3"
    assert client_of(_Context(peer="ipv6:[::1]:5000")) == "[::1]"


def test_with_a_token_the_identity_is_the_token_or_the_client_its_holder_names():
    identify = CallerIdentity("s3cret-token")
    assert identify(_Context()) == identify(_Context(peer="ipv4:10.9.9.9:1")) == "token:" + hashlib.sha256(
        b"s3cret-token").hexdigest()[:12]  # the same on every replica and for every address, never the token
    assert identify(_Context((("x-mirador-client", "billing-batch"),))) == "billing-batch"  # the gateway's clients
    assert CallerIdentity("other-token")(_Context()) != identify(_Context())


def test_config_keys_are_read_and_checked(tmp_path):
    good = write_config(tmp_path, service_extra={
        "router": "rate_limit_per_client: 2.5\nrate_limit_burst: 10",
        "model_host": "max_queue_per_model: 8",
    }, body="fleet:\n  m: {task: text-generation}\nroutes:\n  r: {primary: m, priority: critical}\n")
    config = load_config(good)
    assert config.services.router.rate_limit_per_client == 2.5 and config.services.router.rate_limit_burst == 10
    assert config.services.model_host.max_queue_per_model == 8 and config.routes["r"].priority == "critical"
    defaults = parse_config("fleet:\n  m: {task: text-generation}\nroutes:\n  r: {primary: m}\n")
    assert defaults.services.model_host.max_queue_per_model == 32 and defaults.routes["r"].priority == "normal"
    assert defaults.services.router.rate_limit_per_client == 0
    bad = ("services:\n  router: {rate_limit_per_client: -1, rate_limit_burst: x}\n"
           "  model_host: {max_queue_per_model: 0}\n"
           "fleet:\n  m: {task: text-generation}\nroutes:\n  r: {primary: m, priority: urgent}\n")
    with pytest.raises(ConfigError) as caught:
        parse_config(bad)
    keys = {p.key for p in caught.value.problems}
    assert keys == {"services.router.rate_limit_per_client", "services.router.rate_limit_burst",
                    "services.model_host.max_queue_per_model", "routes.r.priority"}


# --------------------------------------------------------------------------- real processes

FLEET = """
fleet:
  tiny-lm: {task: text-generation, tier: hot}
  tiny-lm-slow: {task: text-generation, tier: hot}
routes:
  chat: {primary: tiny-lm}
  slow: {primary: tiny-lm-slow, timeout_ms: 20000}
  slow-critical: {primary: tiny-lm-slow, timeout_ms: 20000, priority: critical}
security:
  auth:
    bearer_token_file: router-token.txt
"""
# With a token, the token holder names the clients it speaks for in `x-mirador-client` (as the
# gateway does); without one, that metadata is ignored (services/router/identity.py).
AUTH = ("authorization", "Bearer admission-test-token")
SLOW_S = 1.5
LIMIT = 4  # 3 normal places + 1 kept for critical calls
USER = common_pb2.ROLE_USER


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    directory = tmp_path_factory.mktemp("admission")
    repository = ModelRepository(directory / "models")
    build_tiny_decoder(repository, "tiny-lm")
    build_tiny_decoder(repository, "tiny-lm-slow", seed=2)
    (directory / "router-token.txt").write_text(AUTH[1].split()[1] + "\n")
    config = write_config(directory, body=FLEET, service_extra={
        "router": "rate_limit_per_client: 2\nrate_limit_burst: 3",
        "model_host": f"max_queue_per_model: {LIMIT}",
    })
    mesh = Mesh(load_config(config), log_dir=directory / "logs", services=("router", "model_host"),
                env={DELAY_ENV: f"tiny-lm-slow={SLOW_S * 1000:.0f}", "XDG_CACHE_HOME": str(directory / "cache")})
    try:
        mesh.start(timeout_s=60)
        yield mesh
    finally:
        mesh.stop()


@pytest.fixture(scope="module")
def host(mesh):
    with grpc.insecure_channel(mesh.config.services.model_host.address) as channel:
        stub = model_host_pb2_grpc.ModelHostStub(channel)
        deadline = time.monotonic() + 30
        while not all(m.ready for m in stub.ListModels(model_host_pb2.ListModelsRequest(), timeout=5).models):
            assert time.monotonic() < deadline, "tiny models not ready"
            time.sleep(0.1)
        yield stub


def _generate(stub, critical=False):
    request = model_host_pb2.GenerateRequest(model="tiny-lm-slow", messages=[common_pb2.ChatMessage(role=USER, content="hi")],
                                             sampling=common_pb2.SamplingParams(max_tokens=2))
    metadata = (("x-mirador-priority", "critical"),) if critical else None
    return list(stub.Generate(request, timeout=30, metadata=metadata))


def _in_flight(stub, model="tiny-lm-slow"):
    listing = stub.ListModels(model_host_pb2.ListModelsRequest(), timeout=5)
    return next(m.requests_in_flight for m in listing.models if m.name == model)


def _wait_in_flight(stub, count, timeout_s=10):
    deadline = time.monotonic() + timeout_s
    while _in_flight(stub) < count:
        assert time.monotonic() < deadline, f"{count} calls never got in flight"
        time.sleep(0.02)


def _timed_error(call):
    started = time.perf_counter()
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value, time.perf_counter() - started


def test_a_full_model_queue_sheds_at_once_and_critical_calls_keep_their_share(host):
    with ThreadPoolExecutor(4) as pool:
        normal = [pool.submit(_generate, host) for _ in range(LIMIT - 1)]
        _wait_in_flight(host, LIMIT - 1)
        error, took_s = _timed_error(lambda: _generate(host))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "`tiny-lm-slow`" in error.details() and "max_queue_per_model" in error.details()
        assert took_s < 0.5  # refused at once, not after the 1.5 s the queued calls take
        critical = pool.submit(_generate, host, True)  # the kept place
        _wait_in_flight(host, LIMIT)
        error, took_s = _timed_error(lambda: _generate(host, critical=True))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and took_s < 0.5
        assert f"max_queue_per_model = {LIMIT}" in error.details()
        other = host.Generate(model_host_pb2.GenerateRequest(  # another model is not affected
            model="tiny-lm", prompt="hello", sampling=common_pb2.SamplingParams(max_tokens=2)), timeout=10)
        assert list(other)[-1].HasField("summary")
        for future in [*normal, critical]:
            assert future.result()[-1].HasField("summary")
    assert _generate(host)[-1].HasField("summary")  # places are given back
    assert _in_flight(host) == 0


def test_a_flood_is_shed_and_the_host_stays_up(mesh, host):
    outcomes = []
    lock = threading.Lock()

    def one():
        try:
            _generate(host)
            result = "ok"
        except grpc.RpcError as exc:
            result = exc.code()
        with lock:
            outcomes.append(result)

    # All 24 calls go out together and each holds its place for SLOW_S (1.5 s), far longer than
    # they take to arrive: exactly the normal places are admitted, the critical one stays free.
    start = threading.Barrier(24)

    def released():
        start.wait(10)
        one()

    threads = [threading.Thread(target=released) for _ in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(outcomes) == 24
    assert set(outcomes) <= {"ok", grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert outcomes.count("ok") == LIMIT - 1  # never more admitted than the normal places
    assert outcomes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 24 - (LIMIT - 1)
    assert mesh.processes["model_host"].process.poll() is None
    with grpc.insecure_channel(mesh.config.services.model_host.address) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def _ask(router, route, client):
    request = router_pb2.AskRequest(text="hi", route=route, sampling=common_pb2.SamplingParams(max_tokens=2))
    return list(router.Ask(request, timeout=30, metadata=(("x-mirador-client", client), AUTH)))


def test_router_relays_shedding_and_critical_routes_get_the_kept_place(mesh, host):
    with grpc.insecure_channel(mesh.config.services.router.address) as channel:
        router = router_pb2_grpc.RouterStub(channel)
        with ThreadPoolExecutor(4) as pool:
            normal = [pool.submit(_ask, router, "slow", f"filler-{i}") for i in range(LIMIT - 1)]
            _wait_in_flight(host, LIMIT - 1)
            error, took_s = _timed_error(lambda: _ask(router, "slow", "late"))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and took_s < 1.0
            assert "tiny-lm-slow" in error.details() and "max_queue_per_model" in error.details()
            critical = _ask(router, "slow-critical", "critical-client")  # admitted though the normal places are full
            assert critical[-1].summary.model == "tiny-lm-slow"
            for future in normal:
                assert future.result()[-1].HasField("summary")


def test_router_rate_limits_each_client(mesh):
    with grpc.insecure_channel(mesh.config.services.router.address) as channel:
        router = router_pb2_grpc.RouterStub(channel)

        def route(client):
            return router.Route(router_pb2.RouteRequest(text="hi", route="chat"), timeout=5,
                                metadata=(("x-mirador-client", client), AUTH))

        for _ in range(3):  # the burst
            route("greedy")
        with pytest.raises(grpc.RpcError) as caught:
            route("greedy")
        error = caught.value
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "client `greedy`" in error.details() and "2 requests/s" in error.details() and "retry in" in error.details()
        retry_after = dict(error.trailing_metadata() or ()).get("retry-after-ms")
        assert retry_after is not None and 1 <= int(retry_after) <= 500
        route("patient")  # other clients are not affected
        time.sleep(int(retry_after) / 1000 + 0.05)
        route("greedy")  # after the advertised wait, a token is back

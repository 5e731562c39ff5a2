"""The router with real processes and tiny real models: classification, default
route, fallback on errors and on slowness, circuit breaker, sessions across a
model switch, and bad input."""

import os
import signal
import time

import grpc
import pytest
from mirador.v1 import common_pb2, model_host_pb2, model_host_pb2_grpc, router_pb2, router_pb2_grpc

from conftest import free_port, write_config
from services.cli.supervisor import Mesh
from services.common.config import load_config
from services.common.model_repository import ModelRepository
from services.model_host.faults import ENV_VAR as DELAY_ENV
from services.router.fallback import BreakerState, CircuitBreaker
from test_metrics import scrape
from tiny_models import build_tiny_decoder, build_tiny_encoder, chat_tokenizer, chatml, write_corrupt_model

ROUTES = """
fleet:
  tiny-lm: {task: text-generation, tier: hot}
  tiny-lm-b: {task: text-generation, tier: hot}
  tiny-lm-slow: {task: text-generation, tier: hot}
  tiny-lm-slower: {task: text-generation, tier: hot}
  broken-lm: {task: text-generation, tier: cold}
  tiny-embed: {task: embedding, tier: hot}
routes:
  greetings:
    primary: tiny-lm
    examples: [hello there, hi friend, good morning to you, hey how are you, greetings and salutations]
  numbers:
    primary: tiny-lm-b
    examples: [one two three four, count to ten please, the sum of 42 and 17, multiply 3 by 9, 1 2 3 4 5 6 7]
  flaky: {primary: broken-lm, fallback: tiny-lm, timeout_ms: 20000}
  slow: {primary: tiny-lm-slow, fallback: tiny-lm, timeout_ms: 3000}
  late: {primary: tiny-lm-slow, fallback: tiny-lm-slower, timeout_ms: 4000}
  lonely: {primary: broken-lm}
  default: {primary: tiny-lm}
"""
ROUTER_SETTINGS = "default_route: default\nembedding_model: tiny-embed\nmin_confidence: {floor}"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    directory = tmp_path_factory.mktemp("router")
    repository = ModelRepository(directory / "models")
    build_tiny_decoder(repository, "tiny-lm", seed=0)
    build_tiny_decoder(repository, "tiny-lm-b", seed=1)
    build_tiny_decoder(repository, "tiny-lm-slow", seed=2)
    build_tiny_decoder(repository, "tiny-lm-slower", seed=3)
    build_tiny_encoder(repository, "tiny-embed")
    write_corrupt_model(repository, "broken-lm")
    config = write_config(directory, service_extra={"router": ROUTER_SETTINGS.format(floor=0.0),
                                                    "model_host": f"metrics_port: {free_port()}"}, body=ROUTES)
    mesh = Mesh(load_config(config), log_dir=directory / "logs", services=("router", "model_host"),
                env={DELAY_ENV: "tiny-lm-slow=2500,tiny-lm-slower=6000", "XDG_CACHE_HOME": str(directory / "cache")})
    try:
        mesh.start(timeout_s=60)
        yield mesh
    finally:
        mesh.stop()


@pytest.fixture(scope="module")
def router(mesh):
    with grpc.insecure_channel(mesh.config.services.router.address) as channel:
        yield router_pb2_grpc.RouterStub(channel)


def ask(router, text, route="", session="", max_tokens=4):
    responses = list(router.Ask(router_pb2.AskRequest(
        text=text, route=route, session_id=session, sampling=common_pb2.SamplingParams(max_tokens=max_tokens)), timeout=60))
    assert responses[0].HasField("route") and responses[-1].HasField("summary")
    return responses[0].route, responses[-1].summary


def error_of(call):
    with pytest.raises(grpc.RpcError) as caught:
        result = call()
        if not hasattr(result, "SerializeToString"):
            list(result)
    return caught.value.code(), caught.value.details()


# --------------------------------------------------------------------------- classification


@pytest.mark.parametrize("text, route", [("hello there", "greetings"), ("count to ten please", "numbers")])
def test_examples_are_classified_to_their_route_with_calibrated_scores(router, text, route):
    decision = router.Route(router_pb2.RouteRequest(text=text), timeout=60)
    assert decision.route == route and decision.reason == router_pb2.ROUTE_REASON_CLASSIFIED
    assert {s.route for s in decision.scores} == {"greetings", "numbers"}  # routes with examples only
    assert sum(s.score for s in decision.scores) == pytest.approx(1.0, abs=1e-5)
    assert decision.confidence == pytest.approx(decision.scores[0].score) and decision.scores[0].route == route


def test_explicit_route_wins_over_classification(router):
    decision = router.Route(router_pb2.RouteRequest(text="hello there", route="numbers"), timeout=10)
    assert decision.route == "numbers" and decision.reason == router_pb2.ROUTE_REASON_EXPLICIT and not decision.scores


def test_classification_honours_the_callers_deadline(mesh, router):
    """The embedding call that classifies gets what the caller has left (not a fixed 60 s): with the
    model host stopped, the router answers DEADLINE_EXCEEDED with its reason before the caller's
    own deadline passes."""
    router.Route(router_pb2.RouteRequest(text="hello there"), timeout=30)  # routes learned
    host = mesh.processes["model_host"].process
    os.kill(host.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        code, details = error_of(lambda: router.Route(router_pb2.RouteRequest(text="hello there"), timeout=2))
        elapsed = time.monotonic() - started
    finally:
        os.kill(host.pid, signal.SIGCONT)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "classifying the request took longer than the" in details and "name a route" in details, details
    assert elapsed < 2.0
    assert router.Route(router_pb2.RouteRequest(text="hello there"), timeout=30).route == "greetings"


def test_below_the_confidence_floor_the_default_route_answers(mesh, tmp_path):
    # A second router on the same model host, whose floor no score can reach.
    config_text = mesh.config.path.read_text().replace("min_confidence: 0.0", "min_confidence: 1.0")
    path = tmp_path / "strict.yaml"
    path.write_text(config_text.replace(f"port: {mesh.config.services.router.port}\n", f"port: {_free_port()}\n", 1))
    strict = Mesh(load_config(path), log_dir=tmp_path / "logs", services=("router",))
    strict.start(timeout_s=60)
    try:
        with grpc.insecure_channel(strict.config.services.router.address) as channel:
            decision = router_pb2_grpc.RouterStub(channel).Route(router_pb2.RouteRequest(text="hello there"), timeout=60)
    finally:
        strict.stop()
    assert decision.route == "default" and decision.reason == router_pb2.ROUTE_REASON_LOW_CONFIDENCE
    assert decision.confidence < 1.0 and decision.scores  # the scores it did not trust are shown


def _free_port():
    from conftest import free_port

    return free_port()


# --------------------------------------------------------------------------- model choice


def test_fallback_answers_when_the_primary_fails_before_its_first_token(router):
    _, summary = ask(router, "hi", route="flaky")
    assert summary.model == "tiny-lm" and summary.fell_back
    assert summary.attempted_models[-1] == "tiny-lm"
    assert summary.usage.completion_tokens == 4


def test_fallback_answers_when_the_primary_is_too_slow(router):
    # tiny-lm-slow waits 2.5 s before its prefill; with a fallback behind it, it has half of the 3 s budget.
    _, summary = ask(router, "hi", route="slow")
    assert summary.model == "tiny-lm" and summary.fell_back
    assert list(summary.attempted_models) == ["tiny-lm-slow", "tiny-lm"]


def test_a_late_primary_keeps_its_place_when_its_fallback_is_slower(mesh, router):
    """The soak's lost calls: a primary slow under load (2.5 s of the route's 4 s), a fallback slower
    still (6 s). The fallback joins at 2 s, the primary is not cancelled, answers first, and the
    fallback's call is cancelled on the host."""
    started = time.monotonic()
    _, summary = ask(router, "hi", route="late")
    assert summary.model == "tiny-lm-slow" and not summary.fell_back
    assert list(summary.attempted_models) == ["tiny-lm-slow", "tiny-lm-slower"]
    assert summary.usage.completion_tokens == 4
    assert 2.5 <= time.monotonic() - started < 4.0
    with grpc.insecure_channel(mesh.config.services.model_host.address) as channel:
        host = model_host_pb2_grpc.ModelHostStub(channel)
        deadline = time.monotonic() + 2.0
        while True:
            models = {m.name: m for m in host.ListModels(model_host_pb2.ListModelsRequest(), timeout=5).models}
            if not models["tiny-lm-slower"].requests_in_flight or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    assert models["tiny-lm-slower"].requests_in_flight == 0  # the overtaken call left the host
    # the fallback went as a hedge, and the host, its cores idle (the primary sleeps), admitted it
    hedges = scrape(mesh.config.services.model_host.metrics_port)
    assert hedges[("mirador_model_hedges_total", (("model", "tiny-lm-slower"), ("outcome", "admitted")))] == 1
    assert ("mirador_model_hedges_total", (("model", "tiny-lm-slower"), ("outcome", "refused"))) not in hedges


def test_failing_model_opens_its_circuit_and_requests_stop_paying_for_it(router):
    details = []
    for _ in range(4):
        code, message = error_of(lambda: router.Ask(router_pb2.AskRequest(text="hi", route="lonely"), timeout=30))
        details.append(message)
        assert code == grpc.StatusCode.UNAVAILABLE
    assert "broken-lm" in details[0] and "failed to load" in details[0]
    assert "circuit open" in details[-1]


def test_circuit_breaker_half_open_lets_one_probe_through():
    now = [0.0]
    breaker = CircuitBreaker(failure_threshold=2, cooldown_s=10, clock=lambda: now[0])
    breaker.record_failure()
    assert breaker.allow() and breaker.state == BreakerState.CLOSED
    breaker.record_failure()
    assert breaker.state == BreakerState.OPEN and not breaker.allow()
    now[0] = 10.0
    assert breaker.allow() and breaker.state == BreakerState.HALF_OPEN  # the probe
    assert not breaker.allow()  # only one at a time
    breaker.record_failure()
    assert breaker.state == BreakerState.OPEN and not breaker.allow()
    now[0] = 20.0
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state == BreakerState.CLOSED and breaker.allow() and breaker.allow()


# --------------------------------------------------------------------------- sessions


def test_session_context_survives_a_model_switch(router):
    _, first = ask(router, "hello there", route="greetings", session="s-1")
    _, second = ask(router, "count to ten please", route="numbers", session="s-1")
    assert (first.model, second.model) == ("tiny-lm", "tiny-lm-b")
    assert second.session_id == "s-1"
    # The second model saw the whole conversation: its prompt is the templated three turns.
    from tiny_models import chatml

    expected = chatml([("user", "hello there"), ("assistant", first.text), ("user", "count to ten please")])
    assert second.usage.prompt_tokens == len(chat_tokenizer().encode(expected, add_special_tokens=False).ids)
    _, alone = ask(router, "count to ten please", route="numbers")
    assert alone.usage.prompt_tokens < second.usage.prompt_tokens


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("request_, code, phrase", [
    (router_pb2.AskRequest(text=""), grpc.StatusCode.INVALID_ARGUMENT, "`text` is empty"),
    (router_pb2.AskRequest(text="hi", route="atlantis"), grpc.StatusCode.NOT_FOUND, "known routes"),
    (router_pb2.AskRequest(text="x" * (10 * 1024 * 1024)), grpc.StatusCode.INVALID_ARGUMENT, "send at most 32768 bytes"),
    (router_pb2.AskRequest(text="hi", session_id="s" * 500), grpc.StatusCode.INVALID_ARGUMENT, "session_id"),
    (router_pb2.AskRequest(text="hi", prompt="hi"), grpc.StatusCode.INVALID_ARGUMENT, "not text and prompt"),
    (router_pb2.AskRequest(prompt="hi", session_id="s1"), grpc.StatusCode.INVALID_ARGUMENT, "the caller keeps it"),
    (router_pb2.AskRequest(messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_ASSISTANT, content="hi")]),
     grpc.StatusCode.INVALID_ARGUMENT, "the last message is the assistant's"),
    (router_pb2.AskRequest(text="hi", model="tiny-lm", route="greetings"), grpc.StatusCode.INVALID_ARGUMENT,
     "set `route` or `model`, not both"),
    (router_pb2.AskRequest(text="hi", model="atlantis"), grpc.StatusCode.NOT_FOUND, "text-generation models: broken-lm"),
    (router_pb2.AskRequest(text="hi", model="tiny-embed"), grpc.StatusCode.INVALID_ARGUMENT,
     "does embedding, not text-generation"),
])
def test_bad_input_gets_a_clear_status(router, request_, code, phrase):
    got, details = error_of(lambda: router.Ask(request_, timeout=30))
    assert got == code and phrase in details


def test_invalid_utf8_gets_invalid_argument(mesh):
    valid = router_pb2.RouteRequest(text="hello", route="greetings").SerializeToString()
    broken = valid.replace(b"hello", b"hel\xffo")
    with grpc.insecure_channel(mesh.config.services.router.address) as channel:
        raw = channel.unary_unary("/mirador.v1.Router/Route")
        got, details = error_of(lambda: raw(broken, timeout=10))
    assert got == grpc.StatusCode.INVALID_ARGUMENT and "not a valid message" in details


# --------------------------------------------------------------------------- messages, a named model, raw prompts, Embed


def test_a_named_model_answers_alone_and_a_conversation_is_sent_whole(router):
    messages = [common_pb2.ChatMessage(role=common_pb2.ROLE_SYSTEM, content="Be brief."),
                common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="count to ten please")]
    events = list(router.Ask(router_pb2.AskRequest(model="tiny-lm-b", messages=messages,
                                                   sampling=common_pb2.SamplingParams(max_tokens=4)), timeout=60))
    decision, summary = events[0].route, events[-1].summary
    assert decision.route == "" and decision.model == "tiny-lm-b" and not decision.fallbacks
    assert summary.model == "tiny-lm-b" and summary.attempted_models == ["tiny-lm-b"]
    expected = chatml([("system", "Be brief."), ("user", "count to ten please")], system=None)
    assert summary.usage.prompt_tokens == len(chat_tokenizer().encode(expected, add_special_tokens=False).ids)
    # routing reads the last user turn of a conversation
    classified = list(router.Ask(router_pb2.AskRequest(messages=messages, sampling=common_pb2.SamplingParams(
        max_tokens=2)), timeout=60))[0].route
    assert classified.route == "numbers"


def test_a_named_model_that_fails_has_no_fallback(router):
    code, details = error_of(lambda: router.Ask(router_pb2.AskRequest(text="hi", model="broken-lm"), timeout=60))
    assert code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION) and "broken-lm" in details
    assert "route ``" not in details, details  # no empty route name: the message names the model asked for


def test_a_raw_prompt_is_continued_without_the_chat_template(router):
    events = list(router.Ask(router_pb2.AskRequest(prompt="one two three", route="numbers",
                                                   sampling=common_pb2.SamplingParams(max_tokens=3)), timeout=60))
    summary = events[-1].summary
    assert summary.usage.prompt_tokens == len(chat_tokenizer().encode("one two three", add_special_tokens=False).ids)


def test_embed_relays_the_model_hosts_vectors_and_refuses_other_models(router):
    from mirador.v1 import model_host_pb2

    reply = router.Embed(model_host_pb2.EmbedRequest(model="tiny-embed", texts=["a cat", "a dog"]), timeout=30)
    assert reply.model == "tiny-embed" and len(reply.embeddings) == 2 and reply.dimension == 32
    code, details = error_of(lambda: router.Embed(model_host_pb2.EmbedRequest(model="tiny-lm", texts=["x"]), timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "does text-generation, not embedding" in details
    code, details = error_of(lambda: router.Embed(model_host_pb2.EmbedRequest(model="tiny-embed"), timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT

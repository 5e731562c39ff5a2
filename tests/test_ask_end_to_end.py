"""A request through the router to a real model host and back, as `mirador ask` sends it:
one model (tiny), a consensus route whose primary is down (tiny), and the shipped default
config's `compliance` consensus route on the real fleet."""

import json
import subprocess
import sys
import time

import grpc
import pytest
from mirador.v1 import router_pb2, router_pb2_grpc

from conftest import REPO, write_config
from services.cli.supervisor import Mesh
from services.common.config import load_config
from services.common.model_repository import ModelNotFoundError, ModelRepository
from tiny_models import build_tiny_decoder, chat_tokenizer, chatml, greedy_reference, write_corrupt_model

FLEET = """
fleet:
  tiny-lm: {task: text-generation, tier: hot}
routes:
  chat: {primary: tiny-lm, timeout_ms: 10000}
"""


@pytest.fixture(scope="module")
def mesh_with_model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ask")
    repository = ModelRepository(directory / "models")
    build_tiny_decoder(repository, "tiny-lm")
    config_path = write_config(directory, body=FLEET)
    mesh = Mesh(load_config(config_path), log_dir=directory / "logs", services=("router", "model_host"),
                env={"XDG_CACHE_HOME": str(directory / "cache")})  # optimised graphs stay in the test's folder
    mesh.start()
    try:
        yield mesh, repository
    finally:
        mesh.stop()


def test_mirador_ask_streams_the_model_answer_through_the_router(mesh_with_model):
    mesh, repository = mesh_with_model
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "--config", str(mesh.config.path), "ask", "hello world",
         "--route", "chat", "--max-tokens", "8", "--json"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    events = json.loads(result.stdout)
    assert list(events[0]) == ["route"] and events[0]["route"]["model"] == "tiny-lm"
    tokens = [e["token"] for e in events if "token" in e]
    summary = events[-1]["summary"]
    ids = chat_tokenizer().encode(chatml([("user", "hello world")]), add_special_tokens=False).ids
    assert [t.get("token_id", 0) for t in tokens] == greedy_reference(repository.get("tiny-lm"), ids, 8)
    assert summary["model"] == "tiny-lm" and summary["route"] == "chat"
    assert summary["text"] == "".join(t.get("text", "") for t in tokens)
    assert summary["confidence"]["calibration_source"]


def test_mirador_ask_prints_route_answer_and_confidence(mesh_with_model):
    mesh, _ = mesh_with_model
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "--config", str(mesh.config.path), "ask", "hello", "--route", "chat",
         "--max-tokens", "4"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("[route chat → tiny-lm")
    assert "[answered by tiny-lm; mean logprob" in result.stdout


def mirador(config_path, *args, timeout=120):
    result = subprocess.run([sys.executable, "-m", "services.cli", "--config", str(config_path), *args],
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr
    return result.stdout


# --------------------------------------------------------------------------- consensus, primary down

CONSENSUS_FLEET = """
fleet:
  broken-lm: {task: text-generation, tier: cold}
  tiny-lm: {task: text-generation, tier: hot}
  tiny-lm-b: {task: text-generation, tier: hot}
routes:
  compliance:
    primary: broken-lm
    validators: [tiny-lm, tiny-lm-b]
    fallback: tiny-lm
    options: [compliant, non-compliant, needs review]
    consensus_threshold: 1.0
    timeout_ms: 10000
"""


@pytest.fixture(scope="module")
def consensus_mesh(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ask-consensus")
    repository = ModelRepository(directory / "models")
    write_corrupt_model(repository, "broken-lm")
    build_tiny_decoder(repository, "tiny-lm")
    build_tiny_decoder(repository, "tiny-lm-b", seed=1)
    config_path = write_config(directory, body=CONSENSUS_FLEET)
    mesh = Mesh(load_config(config_path), log_dir=directory / "logs", services=("router", "consensus", "model_host"),
                env={"XDG_CACHE_HOME": str(directory / "cache")})
    mesh.start()
    try:
        yield mesh
    finally:
        mesh.stop()


def test_mirador_ask_on_a_consensus_route_prints_every_vote_the_verdict_and_the_case(consensus_mesh):
    """The primary is down: its vote is a failure, the validators decide, the case is escalated
    (threshold 1.0) and `mirador review list` shows it. The fallback is not asked on a consensus route."""
    path = consensus_mesh.config.path
    out = mirador(path, "ask", "Is it compliant to fax lab results?", "--route", "compliance")
    lines = out.splitlines()
    assert lines[0].startswith("[route compliance → broken-lm")
    votes = [line for line in lines if line.startswith("[vote ")]
    assert len(votes) == 3
    assert any(v.startswith("[vote broken-lm (primary): FAILED after ") for v in votes), votes
    for model in ("tiny-lm", "tiny-lm-b"):
        (line,) = [v for v in votes if v.startswith(f"[vote {model}: ")]
        assert "confidence " in line and "weight " in line and "compliant " in line and "needs review " in line
    (verdict,) = [line for line in lines if line.startswith("[consensus: ")]
    assert "threshold 1; escalated for human review as " in verdict
    case_id = verdict.split("escalated for human review as ")[1].split()[0]
    assert any("1 of 3 models failed: broken-lm: " in line for line in lines if line.startswith("[method: "))
    assert lines[-1] == "[decided by 3 models; primary broken-lm did not answer]"

    listing = mirador(path, "review", "list")
    assert case_id in listing and "compliance" in listing
    shown = mirador(path, "review", "show", case_id)
    assert "broken-lm (primary): FAILED" in shown


# --------------------------------------------------------------------------- the shipped config, real fleet

HIPAA_QUESTION = "Is it a HIPAA violation to leave a voicemail that mentions a member's diagnosis?"


@pytest.fixture(scope="module")
def default_mesh(tmp_path_factory):
    """The shipped config's fleet and routes on free ports, the user's model repository."""
    shipped = REPO / "config" / "mirador.yaml"
    route = load_config(shipped).routes["compliance"]
    repository = ModelRepository()
    try:
        for name in (route.primary, *route.validators, "minilm-l6"):
            repository.get(name)
    except ModelNotFoundError as exc:
        pytest.skip(f"the real fleet is not built ({exc}); run `mirador fleet build`")
    directory = tmp_path_factory.mktemp("ask-default")
    text = shipped.read_text()
    body = text[text.index("\nfleet:") + 1:]
    config_path = write_config(directory, {"router": "default_route: default",
                                           "model_host": "memory_budget_mb: 3072\nmax_batch_size: 1"}, body=body)
    config_path.write_text(config_path.read_text().replace(f"model_repository: {directory / 'models'}",
                                                           f"model_repository: {repository.root}"))
    config = load_config(config_path)
    assert config.routes == load_config(shipped).routes and config.fleet == load_config(shipped).fleet
    mesh = Mesh(config, log_dir=directory / "logs", services=("router", "consensus", "model_host"))
    mesh.start(timeout_s=120)
    try:
        wait_until_the_router_classifies(config)
        yield mesh, route
    finally:
        mesh.stop()


def wait_until_the_router_classifies(config, timeout_s: float = 120.0) -> None:
    """The router is SERVING before it has embedded its routes' examples; until then it
    answers UNAVAILABLE to requests that name no route."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(config.services.router.address) as channel:
        router = router_pb2_grpc.RouterStub(channel)
        while True:
            try:
                router.Route(router_pb2.RouteRequest(text="hello"), timeout=10)
                return
            except grpc.RpcError as exc:
                # UNAVAILABLE while learning; DEADLINE_EXCEEDED when learning ended too late in one try's 10 s
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) \
                        or time.monotonic() > deadline:
                    raise
            time.sleep(0.5)


@pytest.mark.real_model
def test_the_compliance_question_routes_to_the_consensus_route_and_is_decided_by_every_member(default_mesh):
    mesh, route = default_mesh
    decision = json.loads(mirador(mesh.config.path, "route", HIPAA_QUESTION))
    assert decision["route"] == "compliance" and decision["model"] == route.primary
    assert decision["validators"] == list(route.validators)

    events = json.loads(mirador(mesh.config.path, "ask", HIPAA_QUESTION, "--json"))
    assert events[0]["route"]["route"] == "compliance"
    votes = [e["vote"] for e in events if "vote" in e]
    assert sorted(v["model"] for v in votes) == sorted([route.primary, *route.validators])
    for vote in votes:  # every member answered within the route's timeout, with its own calibration
        assert "error" not in vote, vote
        assert vote["answer"] in route.options
        assert vote["confidence"]["calibration_source"].startswith("temperature-scaled"), vote
    (verdict,) = [e["verdict"] for e in events if "verdict" in e]
    assert verdict["answer"] in route.options
    assert verdict["consensus_threshold"] == pytest.approx(route.consensus_threshold)
    escalated = verdict.get("consistency", 0.0) < route.consensus_threshold
    assert verdict.get("escalated", False) == escalated
    summary = events[-1]["summary"]
    assert summary["route"] == "compliance" and summary["text"] == verdict["answer"]
    if escalated:
        assert summary["escalation_id"] == verdict["escalation_id"]
        cases = json.loads(mirador(mesh.config.path, "review", "list", "--json"))
        assert verdict["escalation_id"] in [c["id"] for c in cases]

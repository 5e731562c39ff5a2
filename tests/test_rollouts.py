"""Versioned rollouts: the config, the policy that judges a candidate and rolls it
back, its state across restarts, and the whole path through a real router and
model host with tiny real models (a broken candidate rolled back by itself, a
shadow candidate compared and then promoted from the CLI)."""

import json
import random
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from mirador.v1 import common_pb2, rollouts_pb2, rollouts_pb2_grpc, router_pb2, router_pb2_grpc

from conftest import free_port, write_config
from services.cli.main import main as mirador
from services.cli.supervisor import Mesh
from services.common.config import ConfigError, RolloutSpec, load_config
from services.common.errors import FailedPrecondition, NotFound
from services.common.model_repository import ModelRepository
from services.router.rollouts import Outcome, RolloutStateFile, Rollouts, State, answers_disagree
from tiny_models import build_tiny_decoder, write_corrupt_model

FLEET = """
fleet:
  lm:
    task: text-generation
    version: "1"
    rollout: {{{rollout}}}
routes:
  chat: {{primary: lm}}
"""


def config_with(tmp_path, rollout: str):
    return load_config(write_config(tmp_path, body=FLEET.format(rollout=rollout)))


def rollouts_for(tmp_path, rollout: str, seed: int = 0) -> Rollouts:
    return Rollouts(config_with(tmp_path, rollout), RolloutStateFile(tmp_path / "rollouts.json"), random.Random(seed))


# --------------------------------------------------------------------------- config


def test_a_rollout_serves_its_candidate_under_its_own_name(tmp_path):
    config = config_with(tmp_path, "version: '2', mode: shadow, share: 0.25, max_disagreement: 0.3")
    assert config.fleet["lm"].rollout == RolloutSpec(version="2", mode="shadow", share=0.25, max_disagreement=0.3)
    candidate = config.fleet["lm@2"]
    assert (candidate.artifact, candidate.version, candidate.rollout, candidate.task) == ("lm", "2", None, "text-generation")


@pytest.mark.parametrize("rollout, needle", [
    ("version: '1'", "is the stable version (1) already"),
    ("version: '2', mode: blue-green", "use one of: canary, shadow"),
    ("version: '2', share: 1.5", "between 0 and 1"),
    ("version: '2', window: 5, min_calls: 10", "larger than `window`"),
    ("version: '2', max_latency_ratio: 0.5", "number >= 1"),
    ("mode: canary", "name the candidate's version"),
    ("version: '2', percent: 10", "unknown key"),
])
def test_bad_rollouts_are_refused_with_the_reason(tmp_path, rollout, needle):
    with pytest.raises(ConfigError) as caught:
        config_with(tmp_path, rollout)
    assert needle in str(caught.value)


def test_a_rollout_needs_the_stable_version_pinned(tmp_path):
    body = "fleet:\n  lm: {task: text-generation, rollout: {version: '2'}}\nroutes:\n  chat: {primary: lm}\n"
    with pytest.raises(ConfigError, match="needs its stable `version:` pinned"):
        load_config(write_config(tmp_path, body=body))


# --------------------------------------------------------------------------- the policy


def test_canary_and_shadow_traffic_follow_the_share(tmp_path):
    canary = rollouts_for(tmp_path, "version: '2', share: 0.2")
    plans = [canary.plan("lm") for _ in range(2000)]
    assert 0.17 < sum(p.answer == "lm@2" for p in plans) / 2000 < 0.23
    assert all(p.mirror is None for p in plans)  # no disagreement limit: nothing mirrored
    shadow = rollouts_for(tmp_path, "version: '2', mode: shadow, share: 0.5")
    plans = [shadow.plan("lm") for _ in range(2000)]
    assert all(p.answer == "lm" for p in plans)  # a shadow never answers
    assert 0.45 < sum(p.mirror == "lm@2" for p in plans) / 2000 < 0.55
    assert canary.plan("another-model").answer == "another-model"


def test_errors_roll_back_once_the_window_has_enough_calls(tmp_path):
    rollouts = rollouts_for(tmp_path, "version: '2', share: 1.0, min_calls: 4, max_error_rate: 0.5")
    for _ in range(3):
        rollouts.record("lm@2", Outcome.FAILED)
    rollouts.record("lm@2", Outcome.IGNORED)  # busy: says nothing about the version
    assert rollouts.get("lm").state == State.ACTIVE  # 3 calls < min_calls
    rollouts.record("lm@2", Outcome.FAILED)
    rollout = rollouts.get("lm")
    assert rollout.state == State.ROLLED_BACK and "error rate 1.00" in rollout.reason
    assert all(rollouts.plan("lm").answer == "lm" for _ in range(50))
    saved = json.loads((tmp_path / "rollouts.json").read_text())
    assert saved["lm@2"]["state"] == "rolled_back" and "error rate" in saved["lm@2"]["reason"]


def test_a_healthy_candidate_stays(tmp_path):
    rollouts = rollouts_for(tmp_path, "version: '2', min_calls: 4, max_error_rate: 0.3, max_latency_ratio: 2")
    for i in range(40):
        rollouts.record("lm", Outcome.OK, 100.0)
        rollouts.record("lm@2", Outcome.FAILED if i % 10 == 0 else Outcome.OK, 150.0)
    assert rollouts.get("lm").state == State.ACTIVE
    window = rollouts.get("lm").window()
    assert window.error_rate == pytest.approx(0.1, abs=0.03) and window.latency_ratio == pytest.approx(1.5)


def test_a_slow_candidate_rolls_back_on_latency(tmp_path):
    rollouts = rollouts_for(tmp_path, "version: '2', min_calls: 5, max_latency_ratio: 2")
    for _ in range(5):
        rollouts.record("lm", Outcome.OK, 100.0)
        rollouts.record("lm@2", Outcome.OK, 350.0)
    rollout = rollouts.get("lm")
    assert rollout.state == State.ROLLED_BACK and "3.50x" in rollout.reason and "max_latency_ratio" in rollout.reason


def test_a_disagreeing_candidate_rolls_back(tmp_path):
    rollouts = rollouts_for(tmp_path, "version: '2', mode: shadow, min_calls: 4, max_disagreement: 0.5")
    for _ in range(4):
        rollouts.compare("lm", "the capital of France is Paris", "the capital of France is Paris, France")
    assert rollouts.get("lm").state == State.ACTIVE
    for _ in range(5):
        rollouts.compare("lm", "the capital of France is Paris", "bananas are yellow fruit")
    assert rollouts.get("lm").state == State.ROLLED_BACK and "compared answers differ" in rollouts.get("lm").reason


def test_answers_disagree_by_word_similarity():
    assert not answers_disagree("yes it is allowed", "yes it is allowed")
    assert not answers_disagree("yes, it is allowed here", "yes, it is allowed")
    assert answers_disagree("yes it is allowed", "no never")


def test_decisions_survive_a_restart_and_a_new_candidate_starts_fresh(tmp_path):
    rollouts = rollouts_for(tmp_path, "version: '2'")
    rollouts.promote("lm", "looks good")
    again = rollouts_for(tmp_path, "version: '2'")
    assert again.get("lm").state == State.PROMOTED and again.plan("lm").answer == "lm@2"
    assert again.serving("lm") == "lm@2"
    again.rollback("lm", "pager went off")
    assert rollouts_for(tmp_path, "version: '2'").get("lm").reason == "operator: pager went off"
    fresh = rollouts_for(tmp_path, "version: '3'")
    assert fresh.get("lm").state == State.ACTIVE  # a new candidate version is judged afresh


def test_a_rolled_back_candidate_cannot_be_promoted(tmp_path):
    rollouts = rollouts_for(tmp_path, "version: '2'")
    rollouts.rollback("lm", "")
    with pytest.raises(FailedPrecondition, match="was rolled back"):
        rollouts.promote("lm", "")
    with pytest.raises(NotFound, match="has no rollout"):
        rollouts.promote("other", "")


def test_an_unreadable_state_file_starts_every_rollout_active(tmp_path):
    (tmp_path / "rollouts.json").write_text("{not json")
    assert rollouts_for(tmp_path, "version: '2'").get("lm").state == State.ACTIVE


# --------------------------------------------------------------------------- through the mesh

MESH_FLEET = """
fleet:
  lm:
    task: text-generation
    tier: hot
    version: "1"
    rollout: {version: "2", mode: canary, share: 1.0, window: 10, min_calls: 3, max_error_rate: 0.5}
  shadowed:
    task: text-generation
    tier: hot
    version: "1"
    rollout: {version: "2", mode: shadow, share: 1.0, window: 10, min_calls: 3, max_disagreement: 1.0, max_latency_ratio: 1000}
routes:
  chat: {primary: lm, timeout_ms: 20000}
  notes: {primary: shadowed, timeout_ms: 20000}
"""


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    directory = tmp_path_factory.mktemp("rollouts")
    repository = ModelRepository(directory / "models")
    build_tiny_decoder(repository, "lm", "1", seed=0)
    write_corrupt_model(repository, "lm", "2")  # a broken new version
    build_tiny_decoder(repository, "shadowed", "1", seed=1)
    build_tiny_decoder(repository, "shadowed", "2", seed=2)
    extra = {"router": f"metrics_port: {free_port()}"}
    mesh = Mesh(load_config(write_config(directory, extra, body=MESH_FLEET)), log_dir=directory / "logs",
                services=("router", "model_host"), env={"XDG_CACHE_HOME": str(directory / "cache")})
    try:
        mesh.start(timeout_s=60)
        yield mesh
    finally:
        mesh.stop()


@pytest.fixture(scope="module")
def channel(mesh):
    with grpc.insecure_channel(mesh.config.services.router.address) as channel:
        yield channel


def ask(channel, route):
    responses = list(router_pb2_grpc.RouterStub(channel).Ask(router_pb2.AskRequest(
        text="hello", route=route, sampling=common_pb2.SamplingParams(max_tokens=4)), timeout=60))
    return responses[0].route, responses[-1].summary


def rollout_of(channel, model):
    listing = rollouts_pb2_grpc.RolloutsStub(channel).ListRollouts(rollouts_pb2.ListRolloutsRequest(), timeout=10)
    return next(r for r in listing.rollouts if r.model == model)


def test_a_broken_canary_is_answered_around_then_rolled_back_by_itself(mesh, channel):
    for _ in range(3):
        decision, summary = ask(channel, "chat")
        assert decision.model == "lm@2" and list(decision.fallbacks) == ["lm"]  # the client is told the plan
        assert summary.model == "lm" and summary.fell_back and list(summary.attempted_models) == ["lm@2", "lm"]
    rollout = rollout_of(channel, "lm")
    assert rollout.state == rollouts_pb2.ROLLOUT_STATE_ROLLED_BACK
    assert rollout.reason.startswith("automatic: error rate 1.00") and rollout.window.candidate_errors == 3
    decision, summary = ask(channel, "chat")
    assert decision.model == "lm" and summary.model == "lm" and not summary.fell_back
    saved = json.loads(Path(mesh.config.services.router.rollout_state).read_text())  # kept across restarts
    assert saved["lm@2"]["state"] == "rolled_back"
    port = mesh.config.services.router.metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        metrics = response.read().decode()
    assert 'mirador_rollout_rollbacks_total{cause="errors",model="lm"} 1.0' in metrics
    assert 'mirador_rollout_state{candidate="lm@2",model="lm",state="rolled_back"} 1.0' in metrics


def test_a_shadow_is_compared_without_answering_then_promoted_from_the_cli(mesh, channel, capsys):
    for _ in range(3):
        decision, summary = ask(channel, "notes")
        assert decision.model == "shadowed" and summary.model == "shadowed"
    # mirrored calls finish in the background: wait for the window to fill
    for _ in range(100):
        window = rollout_of(channel, "shadowed").window
        if window.candidate_calls >= 3 and window.compared >= 3:
            break
        time.sleep(0.1)
    rollout = rollout_of(channel, "shadowed")
    assert rollout.state == rollouts_pb2.ROLLOUT_STATE_ACTIVE and rollout.window.compared >= 3
    assert rollout.window.candidate_p50_ms > 0 and rollout.window.stable_p50_ms > 0

    assert mirador(["--config", str(mesh.config.path), "rollout", "promote", "shadowed", "--reason", "shadow looked fine"]) == 0
    assert "now goes to version 2" in capsys.readouterr().out
    decision, summary = ask(channel, "notes")
    assert decision.model == "shadowed@2" and summary.model == "shadowed@2" and not summary.fell_back
    assert mirador(["--config", str(mesh.config.path), "rollout", "list"]) == 0
    listing = capsys.readouterr().out
    assert "promoted" in listing and "rolled back" in listing and "shadow looked fine" in listing


def test_rollout_commands_say_what_to_fix(mesh, channel, capsys):
    stub = rollouts_pb2_grpc.RolloutsStub(channel)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Promote(rollouts_pb2.RolloutActionRequest(model="lm"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "was rolled back" in caught.value.details()
    with pytest.raises(grpc.RpcError) as caught:
        stub.Rollback(rollouts_pb2.RolloutActionRequest(model="nope"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND and "models with one: lm, shadowed" in caught.value.details()
    with pytest.raises(grpc.RpcError) as caught:
        stub.Rollback(rollouts_pb2.RolloutActionRequest(model=""), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert mirador(["--config", str(mesh.config.path), "status"]) == 1  # consensus/quantizer are not running here
    out = capsys.readouterr().out
    assert "rollout of" in out and "shadowed" in out


def test_a_rollout_added_by_a_reload_starts_serving(tmp_path):
    repository = ModelRepository(tmp_path / "models")
    build_tiny_decoder(repository, "lm", "1", seed=0)
    build_tiny_decoder(repository, "lm", "2", seed=3)
    body = "fleet:\n  lm: {task: text-generation, version: '1'}\nroutes:\n  chat: {primary: lm}\n"
    path = write_config(tmp_path, body=body)
    mesh = Mesh(load_config(path), log_dir=tmp_path / "logs", services=("router", "model_host"),
                env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    try:
        mesh.start(timeout_s=60)
        with grpc.insecure_channel(mesh.config.services.router.address) as channel:
            assert ask(channel, "chat")[1].model == "lm"
            path.write_text(path.read_text().replace("version: '1'}", "version: '1', rollout: {version: '2', share: 1.0}}"))
            assert mirador(["--config", str(path), "reload"]) == 0
            for _ in range(100):  # each process applies the file on its own
                listing = rollouts_pb2_grpc.RolloutsStub(channel).ListRollouts(rollouts_pb2.ListRolloutsRequest(), timeout=10)
                if listing.rollouts:
                    break
                time.sleep(0.1)
            decision, summary = ask(channel, "chat")
            assert decision.model == "lm@2" and summary.model == "lm@2" and not summary.fell_back
    finally:
        mesh.stop()

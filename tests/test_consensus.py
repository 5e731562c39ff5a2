"""The consensus service as a real process, asking a real model host that serves tiny
real ONNX models (three decoders with different seeds as voters, a tiny encoder as the
embedding model): streaming votes, the weighted verdict, escalation into the review queue
that survives kill -9, the review queue over gRPC and the `mirador review` CLI, statistics.
Every test runs twice: on the SQLite file (the default) and on PostgreSQL (`state.database_url`,
the real server, a schema of its own), where two consensus replicas also share one queue."""

import asyncio
import math
import os
import signal
import sqlite3
import threading
import time
from dataclasses import dataclass

import grpc
import pytest
import yaml
from mirador.v1 import common_pb2, consensus_pb2, consensus_pb2_grpc, model_host_pb2, model_host_pb2_grpc

from conftest import free_port, write_config
from services.cli.main import main as mirador
from services.cli.supervisor import Mesh
from services.common.config import MiradorConfig, load_config
from services.common.model_repository import ModelRepository
from services.consensus import fanout, voting
from services.common.decision_prompt import decision_messages
from state_servers import POSTGRES_URL, drop_schema, new_schema_name, require_postgres, terminate_backends
from tiny_models import build_tiny_decoder, build_tiny_encoder, write_corrupt_model

VOTERS = ["voter-a", "voter-b", "voter-c"]
# One byte token each (Y = compliant, N = non-compliant, R = needs review): with options of
# different token lengths the tiny random models would all prefer the shortest one.
OPTIONS = ["Y", "N", "R"]
FLEET = """
fleet:
  voter-a: {task: text-generation, tier: hot}
  voter-b: {task: text-generation, tier: hot}
  voter-c: {task: text-generation, tier: hot}
  tiny-embed: {task: embedding, tier: hot}
  broken-lm: {task: text-generation, tier: cold}
routes:
  compliance:
    primary: voter-a
    validators: [voter-b, voter-c]
    consensus_threshold: 0.8
    options: [compliant, non-compliant, needs review]
"""
USER = common_pb2.ROLE_USER


@dataclass
class Env:
    config: MiradorConfig
    host: Mesh
    consensus: Mesh
    db: str
    log_dir: object
    backend: str = "sqlite"
    restarts: int = 0

    def start_consensus(self) -> None:
        self.consensus = Mesh(self.config, log_dir=self.log_dir, services=("consensus",))
        self.consensus.start()

    def kill_consensus(self) -> None:
        """SIGKILL, then move the service to a fresh port with the same database: the killed
        server's accepted connections sit in TIME_WAIT on the old port for a minute, and
        the supervisor (rightly) refuses a port it cannot bind plainly."""
        process = self.consensus.processes["consensus"].process
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(10) == -signal.SIGKILL
        self.consensus.stop()
        data = yaml.safe_load(self.config.path.read_text())
        data["services"]["consensus"]["port"] = free_port()
        self.restarts += 1
        path = self.config.path.with_name(f"mirador.restart{self.restarts}.yaml")
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        self.config = load_config(path)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def env(request, tmp_path_factory):
    schema = None
    state = ""
    if request.param == "postgresql":
        require_postgres()
        schema = new_schema_name()
        state = f"state:\n  database_url: {POSTGRES_URL}\n  database_schema: {schema}\n  statement_timeout_ms: 1000\n"
    directory = tmp_path_factory.mktemp(f"consensus-{request.param}")
    repository = ModelRepository(directory / "models")
    for seed, name in enumerate(VOTERS, start=11):
        build_tiny_decoder(repository, name, seed=seed)
    build_tiny_encoder(repository, "tiny-embed")
    write_corrupt_model(repository, "broken-lm")
    db = directory / "state" / "escalations.sqlite3"
    config = load_config(write_config(
        directory, body=FLEET + state,
        service_extra={"consensus": f"escalation_db: {db}\nembedding_model: tiny-embed"},
    ))
    saved_cache = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(directory / "cache")
    host = Mesh(config, log_dir=directory / "logs", services=("model_host",))
    environment = Env(config, host, None, str(db), directory / "logs", request.param)
    try:
        host.start(timeout_s=60)
        with grpc.insecure_channel(config.services.model_host.address) as channel:
            wait_ready(model_host_pb2_grpc.ModelHostStub(channel), {*VOTERS, "tiny-embed"})
        environment.start_consensus()
        yield environment
    finally:
        if environment.consensus is not None:
            environment.consensus.stop()
        host.stop()
        if schema:
            drop_schema(schema)
        if saved_cache is None:
            os.environ.pop("XDG_CACHE_HOME", None)
        else:
            os.environ["XDG_CACHE_HOME"] = saved_cache


def wait_ready(stub, names, timeout_s=60):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        listing = {m.name: m for m in stub.ListModels(model_host_pb2.ListModelsRequest(), timeout=5).models}
        if all(listing[n].ready for n in names):
            return
        time.sleep(0.1)
    raise AssertionError(f"not ready in {timeout_s} s: {names}")


@pytest.fixture
def consensus(env):
    with grpc.insecure_channel(env.config.services.consensus.address) as channel:
        yield consensus_pb2_grpc.ConsensusStub(channel)


@pytest.fixture
def host(env):
    with grpc.insecure_channel(env.config.services.model_host.address) as channel:
        yield model_host_pb2_grpc.ModelHostStub(channel)


def user(text):
    return [common_pb2.ChatMessage(role=USER, content=text)]


@pytest.fixture(scope="module")
def disputed(env):
    """Questions the three voters disagree on (found by asking the model host directly):
    the tiny models are nearly certain of their own answers, so only disagreement brings
    consistency below 1 and escalates at a threshold of 1.0."""
    found = []
    with grpc.insecure_channel(env.config.services.model_host.address) as channel:
        host = model_host_pb2_grpc.ModelHostStub(channel)
        for n in range(80):
            text = f"Request {n}: is this compliant?"
            if label_outcome(host, text, VOTERS).consistency < 0.9:
                found.append(text)
            if len(found) == 3:
                return found
    raise AssertionError(f"the voters agree on every question; found only {found}")


def decide(stub, text="Is this request compliant?", *, models=VOTERS, options=OPTIONS, threshold=0.01,
           route="compliance", request_id="", timeout=30, **sampling):
    request = consensus_pb2.DecideRequest(
        request_id=request_id, route=route, models=models, messages=user(text), options=options,
        consensus_threshold=threshold, sampling=common_pb2.SamplingParams(**sampling))
    responses = list(stub.Decide(request, timeout=timeout))
    votes = [r.vote for r in responses if r.HasField("vote")]
    assert [r.WhichOneof("event") for r in responses] == ["vote"] * len(models) + ["verdict"]
    return votes, responses[-1].verdict


def calibrated(confidence) -> dict[str, float]:
    """A vote's distribution as the consensus combines it: tempered to its calibrated confidence."""
    labels = [p.label for p in confidence.label_distribution]
    log_p = [math.log(max(p.probability, 1e-45)) for p in confidence.label_distribution]
    return dict(zip(labels, voting.calibrated_distribution(log_p, confidence.calibrated_confidence)))


def ballots_of(votes, models, options):
    """The votes as the vote maths sees them, in request order."""
    by_model = {v.model: v for v in votes}
    ballots = []
    for i, model in enumerate(models):
        v = by_model[model]
        dist = calibrated(v.confidence) if options else None
        ballots.append(voting.Ballot(model, primary=i == 0, answer=v.answer, error=v.error,
                                     confidence=v.confidence.calibrated_confidence, distribution=dist))
    return ballots


def status_of(call):
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code(), caught.value.details()


# --------------------------------------------------------------------------- Decide


def test_decide_streams_one_vote_per_model_then_the_weighted_verdict(consensus, host):
    before = consensus.GetStats(consensus_pb2.GetStatsRequest(), timeout=5)
    votes, verdict = decide(consensus, threshold=0.01)
    assert sorted(v.model for v in votes) == sorted(VOTERS)
    assert [v.primary for v in votes if v.model == "voter-a"] == [True]
    assert not any(v.primary for v in votes if v.model != "voter-a")
    for vote in votes:  # each vote is the model host's real Score answer
        direct = host.Score(model_host_pb2.ScoreRequest(
            model=vote.model, messages=decision_messages(user("Is this request compliant?"), OPTIONS), options=OPTIONS),
            timeout=10)
        assert vote.answer == direct.best_option and not vote.error
        assert [p.probability for p in vote.confidence.label_distribution] == pytest.approx(
            [p.probability for p in direct.confidence.label_distribution])
        assert vote.weight == pytest.approx(vote.confidence.calibrated_confidence)
        assert vote.latency_ms > 0
    expected = voting.label_vote(ballots_of(votes, VOTERS, OPTIONS), OPTIONS)
    assert verdict.answer == expected.answer
    assert verdict.consistency == pytest.approx(expected.consistency, abs=1e-6)
    assert verdict.consistency == pytest.approx(
        next(p.probability for p in verdict.combined_distribution if p.label == verdict.answer))
    assert [p.label for p in verdict.combined_distribution] == OPTIONS
    assert [p.probability for p in verdict.combined_distribution] == pytest.approx([p for _, p in expected.combined])
    assert verdict.primary_overturned == (verdict.answer != next(v.answer for v in votes if v.primary))
    assert verdict.method == "confidence-weighted label vote"
    assert verdict.consensus_threshold == pytest.approx(0.01)
    # a low threshold does not escalate, and nothing is queued
    assert not verdict.escalated and not verdict.escalation_id
    after = consensus.GetStats(consensus_pb2.GetStatsRequest(), timeout=5)
    assert after.decisions == before.decisions + 1 and after.escalations == before.escalations


def test_high_threshold_escalates_and_the_case_keeps_every_vote(consensus, disputed):
    votes, verdict = decide(consensus, disputed[0], threshold=1.0, request_id="req-esc-1")
    assert verdict.escalated and verdict.escalation_id.startswith("esc-")
    assert verdict.consistency < 1.0 and verdict.answer in OPTIONS  # the models' best guess, for the reviewer
    case = consensus.GetEscalation(consensus_pb2.GetEscalationRequest(id=verdict.escalation_id), timeout=5)
    assert case.id == verdict.escalation_id and case.state == consensus_pb2.ESCALATION_STATE_PENDING
    assert case.route == "compliance" and case.request_id == "req-esc-1"
    assert list(case.messages) == user(disputed[0])
    assert list(case.options) == OPTIONS
    # every vote, primary first: answer, confidence with label distribution, weight, error, latency
    assert [v.model for v in case.votes] == VOTERS
    assert list(case.votes) == sorted(votes, key=lambda v: VOTERS.index(v.model))
    assert all(len(v.confidence.label_distribution) == 3 and v.confidence.calibration_source for v in case.votes)
    assert case.verdict == verdict
    assert abs(case.created_at.seconds - time.time()) < 60
    pending = consensus.ListEscalations(consensus_pb2.ListEscalationsRequest(
        state=consensus_pb2.ESCALATION_STATE_PENDING), timeout=5).escalations
    assert pending[0].id == verdict.escalation_id  # newest first


def test_a_failing_model_votes_with_an_error_and_the_others_decide(consensus):
    models = ["voter-a", "broken-lm", "voter-b"]
    votes, verdict = decide(consensus, models=models)
    broken = next(v for v in votes if v.model == "broken-lm")
    assert broken.error and broken.weight == 0 and not broken.answer
    assert all(not v.error and v.weight > 0 for v in votes if v.model != "broken-lm")
    expected = voting.label_vote(ballots_of(votes, models, OPTIONS), OPTIONS)
    assert verdict.answer == expected.answer
    assert verdict.consistency == pytest.approx(expected.consistency, abs=1e-6)
    assert verdict.method.startswith("confidence-weighted label vote (1 of 3 models failed: broken-lm: ")


def test_free_text_decision_picks_the_confidence_weighted_medoid(consensus, host):
    votes, verdict = decide(consensus, "Say something about the world.", options=[], max_tokens=8)
    assert all(v.answer and not v.error and 0 < v.weight <= 1 for v in votes)
    assert not verdict.combined_distribution
    assert verdict.method == "confidence-weighted embedding medoid (tiny-embed)"
    ballots = ballots_of(votes, VOTERS, [])
    texts = [b.answer for b in ballots]
    embedded = host.Embed(model_host_pb2.EmbedRequest(model="tiny-embed", texts=texts), timeout=10)
    expected = voting.medoid_vote(ballots, [list(e.values) for e in embedded.embeddings], "tiny-embed")
    assert verdict.answer == expected.answer and verdict.answer in texts
    assert verdict.consistency == pytest.approx(expected.consistency, abs=1e-5)
    assert 0 < verdict.consistency <= 1


def test_decide_rejects_what_it_cannot_vote_on(consensus):
    code, details = status_of(lambda: decide(consensus, models=["voter-a", "tiny-embed"]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "embedding model" in details
    code, details = status_of(lambda: decide(consensus, timeout=0.001))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED


# --------------------------------------------------------------------------- durability


def test_kill_9_right_after_an_escalation_keeps_the_case(env, consensus, disputed):
    votes, verdict = decide(consensus, disputed[1], threshold=1.0, request_id="req-kill")
    env.kill_consensus()  # no graceful stop: SIGKILL the moment the id arrived
    env.start_consensus()
    with grpc.insecure_channel(env.config.services.consensus.address) as channel:
        case = consensus_pb2_grpc.ConsensusStub(channel).GetEscalation(
            consensus_pb2.GetEscalationRequest(id=verdict.escalation_id), timeout=5)
    assert case.request_id == "req-kill" and case.verdict == verdict
    assert list(case.votes) == sorted(votes, key=lambda v: VOTERS.index(v.model))


def test_kill_9_mid_requests_loses_no_acknowledged_case(env, disputed):
    address = env.config.services.consensus.address
    acknowledged, failures, stop = [], [], threading.Event()

    def client(index):
        with grpc.insecure_channel(address) as channel:
            stub = consensus_pb2_grpc.ConsensusStub(channel)
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    _, verdict = decide(stub, disputed[(index + n) % 3], threshold=1.0,
                                        request_id=f"r{index}-{n}")
                    assert verdict.escalated
                    acknowledged.append(verdict.escalation_id)
                except grpc.RpcError as exc:
                    failures.append(exc.code())
                    return

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while len(acknowledged) < 6 and time.monotonic() < deadline:
        time.sleep(0.01)
    env.kill_consensus()  # calls are in flight on every client thread
    stop.set()
    for t in threads:
        t.join(10)
    assert len(acknowledged) >= 6 and failures  # the kill cut calls short
    env.start_consensus()
    with grpc.insecure_channel(env.config.services.consensus.address) as channel:
        stub = consensus_pb2_grpc.ConsensusStub(channel)
        for escalation_id in acknowledged:
            assert stub.GetEscalation(consensus_pb2.GetEscalationRequest(id=escalation_id), timeout=5).votes
        listed = [e.request_id for e in stub.ListEscalations(consensus_pb2.ListEscalationsRequest(limit=1000),
                                                             timeout=5).escalations]
        assert len(listed) == len(set(listed))  # no request escalated twice
    if env.backend == "sqlite":
        with sqlite3.connect(env.db) as db:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# --------------------------------------------------------------------------- review queue


def test_resolve_checks_options_records_once_and_keeps_the_case(consensus, disputed):
    _, verdict = decide(consensus, disputed[2], threshold=1.0)
    case_id = verdict.escalation_id
    resolve = consensus.ResolveEscalation
    code, details = status_of(lambda: resolve(consensus_pb2.ResolveEscalationRequest(
        id=case_id, resolution="maybe", reviewer="ana"), timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "'Y', 'N', 'R'" in details
    done = resolve(consensus_pb2.ResolveEscalationRequest(id=case_id, resolution="N", reviewer="ana",
                                                          note="policy 4.2"), timeout=5)
    assert done.state == consensus_pb2.ESCALATION_STATE_RESOLVED and done.resolution == "N"
    assert done.reviewer == "ana" and done.note == "policy 4.2" and done.resolved_at.seconds > 0
    code, details = status_of(lambda: resolve(consensus_pb2.ResolveEscalationRequest(
        id=case_id, resolution="Y", reviewer="bob"), timeout=5))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "resolved already by ana" in details
    assert consensus.GetEscalation(consensus_pb2.GetEscalationRequest(id=case_id), timeout=5).resolution == "N"
    listed = lambda state: [e.id for e in consensus.ListEscalations(  # noqa: E731
        consensus_pb2.ListEscalationsRequest(state=state, limit=1000), timeout=5).escalations]
    assert case_id in listed(consensus_pb2.ESCALATION_STATE_RESOLVED)
    assert case_id not in listed(consensus_pb2.ESCALATION_STATE_PENDING)
    assert case_id in listed(consensus_pb2.ESCALATION_STATE_UNSPECIFIED)  # resolved cases are kept
    for call in (lambda: consensus.GetEscalation(consensus_pb2.GetEscalationRequest(id="esc-nope"), timeout=5),
                 lambda: resolve(consensus_pb2.ResolveEscalationRequest(id="esc-nope", resolution="x", reviewer="a"),
                                 timeout=5)):
        code, details = status_of(call)
        assert code == grpc.StatusCode.NOT_FOUND and "esc-nope" in details


def test_review_cli_lists_shows_and_resolves(env, consensus, disputed, capsys, monkeypatch):
    _, verdict = decide(consensus, disputed[0], threshold=1.0)
    case_id = verdict.escalation_id
    config = ["--config", str(env.config.path)]

    assert mirador([*config, "review", "list"]) == 0
    listing = capsys.readouterr().out
    assert case_id in listing.splitlines()[1] and "pending" in listing  # newest first, under the header

    assert mirador([*config, "review", "show", case_id]) == 0
    shown = capsys.readouterr().out
    assert f"escalation {case_id} (pending)" in shown and disputed[0] in shown
    assert all(f"    {model}" in shown for model in VOTERS) and "voter-a (primary)" in shown

    monkeypatch.setenv("USER", "reviewer-from-env")
    assert mirador([*config, "review", "resolve", case_id, "--decision", "R", "--note", "ask legal"]) == 0
    assert f"resolved {case_id} as 'R' by reviewer-from-env" in capsys.readouterr().out
    assert mirador([*config, "review", "resolve", case_id, "--decision", "Y", "--note", "again"]) == 1
    assert "FAILED_PRECONDITION" in capsys.readouterr().err

    assert mirador([*config, "review", "list", "--state", "resolved"]) == 0
    assert case_id in capsys.readouterr().out
    assert mirador([*config, "review", "list"]) == 0
    assert case_id not in capsys.readouterr().out
    assert mirador([*config, "review", "show", "esc-nope"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err


def test_two_replicas_share_one_review_queue(env, consensus, disputed):
    """A second consensus process on the same database (PostgreSQL: the replicated setup; SQLite:
    two processes on one file, which WAL allows on one machine): a case escalated through one
    replica is listed and resolved through the other, and a retry through the other replays it."""
    data = yaml.safe_load(env.config.path.read_text())
    data["services"]["consensus"]["port"] = free_port()
    path = env.config.path.with_name("mirador.replica-b.yaml")
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    replica = Mesh(load_config(path), log_dir=env.log_dir, services=("consensus",))
    replica.start()
    try:
        with grpc.insecure_channel(replica.config.services.consensus.address) as channel:
            other = consensus_pb2_grpc.ConsensusStub(channel)
            _, verdict = decide(consensus, disputed[1], threshold=1.0, request_id="through-a")
            pending = other.ListEscalations(consensus_pb2.ListEscalationsRequest(
                state=consensus_pb2.ESCALATION_STATE_PENDING, limit=1000), timeout=5).escalations
            assert verdict.escalation_id in [e.id for e in pending]
            _, replayed = decide(other, disputed[1], threshold=1.0, request_id="through-a")
            assert replayed.escalation_id == verdict.escalation_id
            done = other.ResolveEscalation(consensus_pb2.ResolveEscalationRequest(
                id=verdict.escalation_id, resolution="Y", reviewer="ana"), timeout=5)
            assert done.state == consensus_pb2.ESCALATION_STATE_RESOLVED
        code, details = status_of(lambda: consensus.ResolveEscalation(consensus_pb2.ResolveEscalationRequest(
            id=verdict.escalation_id, resolution="N", reviewer="bob"), timeout=5))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "resolved already by ana" in details
        assert consensus.GetEscalation(consensus_pb2.GetEscalationRequest(id=verdict.escalation_id),
                                       timeout=5).resolution == "Y"
    finally:
        replica.stop()


def test_kill_9_of_one_replica_mid_run_loses_and_duplicates_nothing(env, consensus, disputed):
    """Four clients send Decides (each with its own request id) to two replicas in turn; one
    replica is killed -9 mid-run and every call it failed is retried on the other with the
    same request id. Afterwards each acknowledged request has exactly one case: the one the
    client was told."""
    replica = Mesh(load_config(_replica_config(env, "kill")), log_dir=env.log_dir, services=("consensus",))
    replica.start()
    acknowledged: dict[str, str] = {}
    retried: list[str] = []
    try:
        channels = [grpc.insecure_channel(env.config.services.consensus.address),
                    grpc.insecure_channel(replica.config.services.consensus.address)]
        survivor, doomed = (consensus_pb2_grpc.ConsensusStub(c) for c in channels)

        def client(index):
            for n in range(25):
                request_id = f"kill-{index}-{n}"
                stub = doomed if (index + n) % 2 else survivor
                for _ in range(3):
                    try:
                        _, verdict = decide(stub, disputed[n % 3], threshold=1.0, request_id=request_id)
                        acknowledged[request_id] = verdict.escalation_id
                        break
                    except grpc.RpcError:
                        retried.append(request_id)
                        stub = survivor  # the other replica takes the retry

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while len(acknowledged) < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        process = replica.processes["consensus"].process
        os.kill(process.pid, signal.SIGKILL)
        for t in threads:
            t.join(120)
        for channel in channels:
            channel.close()
    finally:
        replica.stop()
    assert len(acknowledged) == 100 and retried  # every request answered in the end; the kill cut some
    cases = consensus.ListEscalations(consensus_pb2.ListEscalationsRequest(limit=1000), timeout=10).escalations
    by_request: dict[str, list[str]] = {}
    for case in cases:
        if case.request_id.startswith("kill-"):
            by_request.setdefault(case.request_id, []).append(case.id)
    assert by_request == {request_id: [case_id] for request_id, case_id in acknowledged.items()}


def _replica_config(env, name: str):
    data = yaml.safe_load(env.config.path.read_text())
    data["services"]["consensus"]["port"] = free_port()
    path = env.config.path.with_name(f"mirador.replica-{name}.yaml")
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_a_postgresql_that_hangs_or_drops_us_costs_the_calls_in_flight_not_the_next(env, consensus, disputed):
    """PostgreSQL only. A table lock held past statement_timeout_ms: UNAVAILABLE with a sentence,
    nothing written. Every connection cut (what a server restart does): the next calls reconnect."""
    if env.backend != "postgresql":
        pytest.skip("PostgreSQL's faults")
    import psycopg

    schema = yaml.safe_load(env.config.path.read_text())["state"]["database_schema"]
    before = consensus.GetStats(consensus_pb2.GetStatsRequest(), timeout=10).decisions
    with psycopg.connect(POSTGRES_URL) as blocker:
        blocker.execute(f"LOCK TABLE {schema}.route_stats IN ACCESS EXCLUSIVE MODE")
        code, details = status_of(lambda: decide(consensus, disputed[0], threshold=1.0, request_id="while-locked"))
        assert code == grpc.StatusCode.UNAVAILABLE, details
        assert "statement_timeout_ms (1000 ms); nothing was written, retry" in details
    assert terminate_backends("mirador-consensus")  # what a PostgreSQL restart does to its connections
    _, verdict = decide(consensus, disputed[0], threshold=1.0, request_id="while-locked")  # the retry succeeds
    assert verdict.escalated and verdict.escalation_id
    assert consensus.GetStats(consensus_pb2.GetStatsRequest(), timeout=10).decisions == before + 1


# --------------------------------------------------------------------------- statistics


def label_outcome(host, text, models):
    ballots = []
    for i, model in enumerate(models):
        reply = host.Score(model_host_pb2.ScoreRequest(model=model, messages=decision_messages(user(text), OPTIONS),
                                                       options=OPTIONS), timeout=10)
        ballots.append(voting.Ballot(model, primary=i == 0, answer=reply.best_option,
                                     confidence=reply.confidence.calibrated_confidence,
                                     distribution=calibrated(reply.confidence)))
    return voting.label_vote(ballots, OPTIONS)


def test_get_stats_counts_overturns_and_agreement(consensus, host):
    # Find (by asking the model host directly) one question whose verdict overturns the
    # primary and one where it does not; the tiny models are deterministic.
    found = {}
    for n in range(60):
        for models in (VOTERS, VOTERS[1:] + VOTERS[:1], VOTERS[2:] + VOTERS[:2]):
            outcome = label_outcome(host, f"Case {n}: may we do this?", models)
            found.setdefault(outcome.primary_overturned, (f"Case {n}: may we do this?", models))
        if len(found) == 2:
            break
    assert set(found) == {True, False}, "no question among 60 where the validators overturn the primary"

    route = "stats-route"
    verdicts = []
    for overturned in (True, False, True):
        text, models = found[overturned]
        votes, verdict = decide(consensus, text, models=models, route=route)
        assert verdict.primary_overturned is overturned
        verdicts.append((votes, verdict))
    votes, verdict = decide(consensus, "With a broken model?", models=["voter-a", "broken-lm"], route=route)
    verdicts.append((votes, verdict))

    stats = consensus.GetStats(consensus_pb2.GetStatsRequest(route=route), timeout=5)
    assert stats.route == route and stats.decisions == 4 and stats.escalations == 0
    assert stats.primary_answered == 4 and stats.primary_overturned == 2 and stats.overturn_rate == pytest.approx(0.5)
    per_model = {m.model: m for m in stats.models}
    assert per_model["broken-lm"].asked == 1 and per_model["broken-lm"].failed == 1
    assert per_model["broken-lm"].answered == 0 and per_model["broken-lm"].agreement_rate == 0
    for model in VOTERS:
        mine = [(v, verdict) for votes, verdict in verdicts for v in votes if v.model == model]
        agreed = sum(v.answer == verdict.answer for v, verdict in mine)
        assert per_model[model].asked == per_model[model].answered == len(mine)
        assert per_model[model].agreement == pytest.approx(agreed)
        assert per_model[model].agreement_rate == pytest.approx(agreed / len(mine))
        assert per_model[model].as_primary == sum(v.primary for v, _ in mine)
    overall = consensus.GetStats(consensus_pb2.GetStatsRequest(), timeout=5)
    assert overall.decisions >= stats.decisions + 1 and overall.since.seconds > 0


# --------------------------------------------------------------------------- fan-out (no processes)


def test_fan_out_yields_in_arrival_order_and_turns_timeouts_and_errors_into_answers():
    delays = {"slow": 5.0, "fast": 0.01, "medium": 0.1}

    async def call(model, timeout_s):
        if model == "broken":
            raise RuntimeError("cannot load")
        await asyncio.sleep(delays[model])
        return f"{model} answered"

    async def run():
        started = time.monotonic()
        answers = [a async for a in fanout.fan_out(["slow", "broken", "medium", "fast"], call, timeout_s=0.3)]
        return answers, time.monotonic() - started

    answers, elapsed = asyncio.run(run())
    assert [a.model for a in answers] == ["broken", "fast", "medium", "slow"]
    assert [a.index for a in answers] == [1, 3, 2, 0]
    assert answers[0].error == "RuntimeError: cannot load" and answers[0].value is None
    assert answers[1].value == "fast answered" and not answers[1].error
    assert answers[3].error == "timed out after 300 ms" and answers[3].latency_ms >= 290
    assert elapsed < 2  # the slow model did not hold the vote up


def test_downstream_budget_keeps_a_reserve_for_the_verdict():
    assert fanout.downstream_budget(1.0) == pytest.approx(0.9)
    assert fanout.downstream_budget(10.0, 5.0) == pytest.approx(4.75)
    assert fanout.downstream_budget(None, None) == pytest.approx(fanout.DEFAULT_BUDGET_S - 0.25)
    assert fanout.downstream_budget(-1.0) <= 0

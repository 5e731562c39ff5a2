"""Rollout decisions in PostgreSQL (`state.database_url`, the real server, a schema per test):
the same restart tests as the JSON file, decisions one router replica makes adopted by
another (in process, and between two router processes over gRPC), a database that stops
answering costs no decision held in memory, and a database that cannot be used stops the
router at start naming the key."""

from __future__ import annotations

import logging
import random
import subprocess
import sys
import time

import grpc
import psycopg
import pytest
from mirador.v1 import rollouts_pb2, rollouts_pb2_grpc

from conftest import REPO, write_config
from services.cli.supervisor import Mesh
from services.common.config import load_config
from services.common.errors import FailedPrecondition
from services.router.rollout_store_pg import REFRESH_S, RolloutStateDatabase
from services.router.rollouts import RolloutStateFile, Rollouts, State
from state_servers import POSTGRES_URL, pg_schema, require_postgres  # noqa: F401

FLEET = """
fleet:
  lm:
    task: text-generation
    version: "1"
    rollout: {{version: "{version}"}}
routes:
  chat: {{primary: lm}}
"""


def state_section(schema: str, **extra) -> str:
    lines = [f"  database_url: {POSTGRES_URL}", f"  database_schema: {schema}"]
    lines += [f"  {k}: {v}" for k, v in extra.items()]
    return "state:\n" + "\n".join(lines) + "\n"


@pytest.fixture(params=["file", "postgresql"])
def replicas(request, tmp_path):
    """Opens Rollouts of one backend on one store (each call = one router replica)."""
    opened = []
    schema = None
    if request.param == "postgresql":
        require_postgres()
        schema = request.getfixturevalue("pg_schema")

    def open_replica(version: str = "2", **extra) -> Rollouts:
        state = state_section(schema, **extra) if schema else ""
        config = load_config(write_config(tmp_path, body=FLEET.format(version=version) + state))
        store = RolloutStateDatabase(config.state) if schema else RolloutStateFile(tmp_path / "rollouts.json")
        opened.append(store)
        return Rollouts(config, store, random.Random(0))

    yield open_replica
    for store in opened:
        if isinstance(store, RolloutStateDatabase):
            store.close()


def test_decisions_survive_a_restart_and_a_new_candidate_starts_fresh(replicas):
    rollouts = replicas()
    rollouts.promote("lm", "looks good")
    again = replicas()
    assert again.get("lm").state == State.PROMOTED and again.serving("lm") == "lm@2"
    again.rollback("lm", "pager went off")
    assert replicas().get("lm").reason == "operator: pager went off"
    assert replicas(version="3").get("lm").state == State.ACTIVE  # a new candidate version is judged afresh


def test_a_decision_one_replica_makes_is_adopted_by_the_others(replicas):
    a, b = replicas(), replicas()
    a.rollback("lm", "error budget spent")
    assert b.get("lm").state == State.ACTIVE  # not until it looks
    assert b.adopt(b.state_file.load()) == ["lm"]
    assert b.get("lm").state == State.ROLLED_BACK and b.get("lm").reason == "operator: error budget spent"
    assert b.plan("lm").answer == "lm"
    assert b.adopt(b.state_file.load()) == []  # nothing new
    with pytest.raises(FailedPrecondition, match="was rolled back"):
        b.promote("lm", "")


def test_a_database_that_stops_answering_keeps_the_decision_in_memory(pg_schema, tmp_path, caplog):
    config = load_config(write_config(tmp_path, body=FLEET.format(version="2") +
                                      state_section(pg_schema, statement_timeout_ms=300)))
    store = RolloutStateDatabase(config.state)
    try:
        rollouts = Rollouts(config, store, random.Random(0))
        with psycopg.connect(POSTGRES_URL) as blocker:
            blocker.execute(f"LOCK TABLE {pg_schema}.rollout_decisions IN ACCESS EXCLUSIVE MODE")
            with caplog.at_level(logging.ERROR, logger="mirador.router.rollouts"):
                rollouts.rollback("lm", "during an outage")  # no exception: the router keeps serving
                assert rollouts.get("lm").state == State.ROLLED_BACK
                assert store.load() == {}  # unreadable too: logged, nothing adopted
        messages = " ".join(r.getMessage() + str(getattr(r, "fields", "")) for r in caplog.records)
        assert "kept in memory only" in messages and "statement_timeout_ms" in messages
        rollouts.rollback("lm", "after the outage")
        assert store.load()["lm@2"]["state"] == "rolled_back"
    finally:
        store.close()


def test_two_router_processes_share_a_rollback(pg_schema, tmp_path):
    meshes, channels = [], []
    try:
        for name in ("a", "b"):
            directory = tmp_path / name
            directory.mkdir()
            config = load_config(write_config(directory, body=FLEET.format(version="2") + state_section(pg_schema)))
            meshes.append(Mesh(config, log_dir=directory / "logs", services=("router",)))
            meshes[-1].start(timeout_s=60)
        channels = [grpc.insecure_channel(m.config.services.router.address) for m in meshes]
        a, b = (rollouts_pb2_grpc.RolloutsStub(channel) for channel in channels)
        done = a.Rollback(rollouts_pb2.RolloutActionRequest(model="lm", reason="bad canary"), timeout=10)
        assert done.state == rollouts_pb2.ROLLOUT_STATE_ROLLED_BACK
        deadline = time.monotonic() + 5 * REFRESH_S
        while time.monotonic() < deadline:
            seen = b.ListRollouts(rollouts_pb2.ListRolloutsRequest(), timeout=10).rollouts[0]
            if seen.state == rollouts_pb2.ROLLOUT_STATE_ROLLED_BACK:
                break
            time.sleep(0.2)
        assert seen.state == rollouts_pb2.ROLLOUT_STATE_ROLLED_BACK and seen.reason == "operator: bad canary"
    finally:
        for channel in channels:
            channel.close()
        for mesh in meshes:
            mesh.stop()


def test_a_database_that_cannot_be_used_stops_the_router_at_start_naming_the_key(tmp_path):
    require_postgres()
    url = "postgresql://postgres@127.0.0.1:5432/no_such_db"
    path = write_config(tmp_path, body=FLEET.format(version="2") + f"state:\n  database_url: {url}\n")
    result = subprocess.run([sys.executable, "-m", "services.router", "--config", str(path)], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "state.database_url: cannot use PostgreSQL" in result.stderr
    assert 'database "no_such_db" does not exist' in result.stderr

"""The escalation store itself, the same tests against both backends: the SQLite file (the
embedded default) and PostgreSQL (`state.database_url`, the real server on 127.0.0.1:5432,
one schema per test). Then what only PostgreSQL has: migrations that two replicas starting
at once apply once, statement timeouts, reconnecting after the server dropped us, and a clear
error at start. The service-level tests are in test_consensus.py (also on both backends)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time

import psycopg
import pytest

from conftest import REPO, write_config
from services.common.state_settings import StateSettings
from services.consensus.escalations import (
    MIGRATIONS,
    SCHEMA_VERSION,
    AlreadyResolved,
    DecisionTally,
    InvalidResolution,
    ModelTally,
    SqliteEscalationStore,
    UnknownEscalation,
)
from state_servers import (  # noqa: F401
    POSTGRES_URL,
    drop_schema,
    new_schema_name,
    pg_schema,
    require_postgres,
    terminate_backends,
)

BACKENDS = ["sqlite", "postgresql"]


def pg_settings(schema: str, **overrides) -> StateSettings:
    return StateSettings(database_url=POSTGRES_URL, database_schema=schema, **overrides)


def open_pg(schema: str, **overrides):
    from services.consensus.escalations_pg import PostgresEscalationStore

    return PostgresEscalationStore(pg_settings(schema, **overrides))


class Backend:
    """Opens stores of one backend on one database (several stores = several replicas)."""

    def __init__(self, kind: str, tmp_path, schema: str | None):
        self.kind, self.path, self.schema = kind, tmp_path / "escalations.sqlite3", schema
        self.opened = []

    def open(self, **overrides):
        store = SqliteEscalationStore(self.path) if self.kind == "sqlite" else open_pg(self.schema, **overrides)
        self.opened.append(store)
        return store

    def close_all(self):
        for store in self.opened:
            store.close()


@pytest.fixture(params=BACKENDS)
def backend(request, tmp_path):
    schema = None
    if request.param == "postgresql":
        require_postgres()
        schema = new_schema_name()
    opened = Backend(request.param, tmp_path, schema)
    yield opened
    opened.close_all()
    if schema:
        drop_schema(schema)


def tally(route="compliance", escalated=True, overturned=False):
    return DecisionTally(route=route, models=[ModelTally("a", True, True, 1.0), ModelTally("b", True, False, 0.25),
                                              ModelTally("c", False, False, None)],
                         escalated=escalated, primary_answered=True, primary_overturned=overturned, no_answer=False)


def case(request_id="req-1", route="compliance", options=("Y", "N")):
    return {"route": route, "request_id": request_id, "messages": [{"role": "user", "content": "Is it ok? ünïcode"}],
            "options": list(options), "votes": [{"model": "a", "answer": "Y"}, {"model": "b", "answer": "N"}],
            "verdict": {"answer": "Y", "consistency": 0.5}}


# --------------------------------------------------------------------------- both backends


def test_a_decision_is_stored_listed_and_counted(backend):
    store = backend.open()
    record = store.record_decision(tally(), case(), now=1000.0)
    store.record_decision(tally(escalated=False))
    assert record.id.startswith("esc-") and record.verdict["escalation_id"] == record.id
    assert store.get(record.id) == record
    assert store.find_request("compliance", "req-1") == record
    assert store.find_request("other-route", "req-1") is None
    assert [r.id for r in store.list()] == [record.id]
    assert store.list("resolved") == []
    stats = store.stats()
    assert (stats.decisions, stats.escalations, stats.primary_answered) == (2, 1, 2)
    assert [(m.model, m.asked, m.answered, m.failed, m.as_primary) for m in stats.models] == [
        ("a", 2, 2, 0, 2), ("b", 2, 2, 0, 0), ("c", 2, 0, 2, 0)]
    assert stats.models[1].agreement == pytest.approx(0.5) and stats.since > 0
    assert store.stats("nope").decisions == 0
    with pytest.raises(UnknownEscalation):
        store.get("esc-nope")


def test_the_list_is_newest_first_and_bounded(backend):
    store = backend.open()
    ids = [store.record_decision(tally(), case(f"req-{i}")).id for i in range(5)]
    assert [r.id for r in store.list(limit=3)] == ids[::-1][:3]


def test_a_case_is_resolved_once_with_one_of_its_options(backend):
    store = backend.open()
    record = store.record_decision(tally(), case())
    with pytest.raises(InvalidResolution):
        store.resolve(record.id, "maybe", "ana")
    done = store.resolve(record.id, "N", "ana", "policy 4.2", now=2000.0)
    assert (done.state, done.resolution, done.reviewer, done.note, done.resolved_at) == (
        "resolved", "N", "ana", "policy 4.2", 2000.0)
    with pytest.raises(AlreadyResolved) as raised:
        store.resolve(record.id, "Y", "bob")
    assert raised.value.record.reviewer == "ana"
    with pytest.raises(UnknownEscalation):
        store.resolve("esc-nope", "Y", "bob")
    stats = store.stats()
    assert (stats.resolved, stats.reviewer_overrides) == (1, 1)


def test_resolved_cases_past_the_retention_are_deleted_and_pending_ones_never(backend):
    store = backend.open()
    old = store.record_decision(tally(), case("old"), now=1000.0)
    store.resolve(old.id, "N", "ana", now=2000.0)
    pending = store.record_decision(tally(), case("pending"), now=1000.0)
    recent = store.record_decision(tally(), case("recent"), now=1000.0)
    store.resolve(recent.id, "Y", "ana", now=9000.0)
    assert store.purge_resolved(older_than_s=5000.0, now=10_000.0) == 1  # resolved before 5000: only `old`
    assert {r.id for r in store.list()} == {pending.id, recent.id}
    with pytest.raises(UnknownEscalation):
        store.get(old.id)
    assert store.purge_resolved(older_than_s=0.0, now=1e12) == 1  # everything resolved goes; pending stays
    assert [r.id for r in store.list()] == [pending.id]
    assert (store.stats().escalations, store.stats().resolved) == (3, 2)  # the counters are not rewritten


def test_a_request_id_escalates_once_and_its_twin_is_not_counted(backend):
    store = backend.open()
    first = store.record_decision(tally(), case("same"))
    again = store.record_decision(tally(), case("same"))
    assert again == first and len(store.list()) == 1
    assert store.stats().decisions == 1  # the twin's transaction was rolled back whole
    assert store.record_decision(tally(route="other"), case("same", route="other")).id != first.id


def test_two_replicas_racing_on_one_request_id_store_one_case(backend):
    """Every replica decides the same retried request at once: one case, counted once."""
    stores = [backend.open() for _ in range(2)] if backend.kind == "postgresql" else [backend.open()]
    results, barrier = [], threading.Barrier(8)

    def decide(index):
        barrier.wait()
        results.append(stores[index % len(stores)].record_decision(tally(), case("raced")))

    threads = [threading.Thread(target=decide, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len({r.id for r in results}) == 1 and len(results) == 8
    assert len(stores[0].list()) == 1 and stores[0].stats().decisions == 1


def test_two_reviewers_racing_on_one_case_resolve_it_once(backend):
    stores = [backend.open() for _ in range(2)] if backend.kind == "postgresql" else [backend.open()]
    record = stores[0].record_decision(tally(), case())
    outcomes, barrier = [], threading.Barrier(6)

    def resolve(index):
        barrier.wait()
        try:
            outcomes.append(stores[index % len(stores)].resolve(record.id, "N", f"reviewer-{index}").reviewer)
        except AlreadyResolved:
            outcomes.append("refused")

    threads = [threading.Thread(target=resolve, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(outcomes).count("refused") == 5
    assert stores[0].stats().resolved == 1


def test_a_reopened_store_keeps_everything_and_migrates_nothing(backend):
    store = backend.open()
    record = store.record_decision(tally(), case())
    assert store.migrated == [m.version for m in MIGRATIONS]
    store.close()
    backend.opened.remove(store)
    again = backend.open()
    assert again.migrated == [] and again.get(record.id) == record
    assert [v for v, _ in again.schema_versions()] == [m.version for m in MIGRATIONS]


# --------------------------------------------------------------------------- SQLite only


def test_a_version_1_sqlite_file_is_migrated_keeping_every_twin(tmp_path):
    """Files written before migration 2 may hold two cases for one request id: both stay, the
    later one renamed, so the replay still finds the first and nothing is deleted."""
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as db:
        for statement in MIGRATIONS[0].sqlite:
            db.execute(statement)
        db.execute("INSERT INTO meta VALUES ('schema_version', '1')")
        for seq, id_ in ((1, "esc-a"), (2, "esc-b")):
            db.execute("INSERT INTO escalations (seq, id, created_at, route, request_id, messages, options, votes, "
                       "verdict, state) VALUES (?, ?, 1.0, 'r', 'twin', '[]', '[]', '[]', '{}', 'pending')", (seq, id_))
    store = SqliteEscalationStore(path)
    try:
        assert store.migrated == [1, 2]  # 1 recorded (its tables were there), 2 applied
        assert store.find_request("r", "twin").id == "esc-a"
        assert store.get("esc-b").request_id == "twin#dup-2"
        assert SCHEMA_VERSION == 2 and store.integrity_ok()
    finally:
        store.close()


# --------------------------------------------------------------------------- PostgreSQL only


def test_replicas_starting_at_once_migrate_once(pg_schema):
    """Four processes open a fresh schema at the same moment: the advisory lock lets one
    migrate; the others wait, then find every version applied."""
    script = (
        "import sys, json, time\n"
        "from services.common.state_settings import StateSettings\n"
        "from services.consensus.escalations_pg import PostgresEscalationStore\n"
        "start = float(sys.argv[3])\n"
        "time.sleep(max(0.0, start - time.time()))\n"
        "store = PostgresEscalationStore(StateSettings(database_url=sys.argv[1], database_schema=sys.argv[2]))\n"
        "print(json.dumps(store.migrated)); store.close()\n"
    )
    start = time.time() + 2.0  # every interpreter is up and imported by then
    processes = [subprocess.Popen([sys.executable, "-c", script, POSTGRES_URL, pg_schema, str(start)], cwd=REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outputs = [p.communicate(timeout=60) for p in processes]
    assert all(p.returncode == 0 for p in processes), [err for _, err in outputs]
    migrated = sorted(out.strip() for out, _ in outputs)
    assert migrated == ["[1, 2]", "[]", "[]", "[]"]
    with psycopg.connect(POSTGRES_URL) as connection:
        rows = connection.execute(f"SELECT version FROM {pg_schema}.schema_migrations ORDER BY version").fetchall()
    assert [r[0] for r in rows] == [1, 2]


def test_a_statement_past_the_timeout_fails_unavailable_and_writes_nothing(pg_schema):
    from services.consensus.escalations_pg import StoreUnavailable

    store = open_pg(pg_schema, statement_timeout_ms=300)
    try:
        record = store.record_decision(tally(), case())
        with psycopg.connect(POSTGRES_URL) as blocker:  # a reviewer's transaction holding the row
            blocker.execute(f"SELECT 1 FROM {pg_schema}.escalations WHERE id = %s FOR UPDATE", (record.id,))
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match="statement_timeout_ms") as raised:
                store.resolve(record.id, "N", "ana")
            assert time.monotonic() - started < 5
            assert raised.value.code.name == "UNAVAILABLE"
        assert store.get(record.id).state == "pending"
        assert store.resolve(record.id, "N", "ana").state == "resolved"  # the pool's connection still works
    finally:
        store.close()


def test_connections_the_server_dropped_are_replaced_before_the_next_call(pg_schema):
    """What a PostgreSQL restart does to the pool: every connection dies; the next calls reconnect."""
    store = open_pg(pg_schema)
    try:
        record = store.record_decision(tally(), case())
        assert terminate_backends("mirador-consensus")
        assert store.get(record.id) == record
        assert store.record_decision(tally(), case("after")).request_id == "after"
    finally:
        store.close()


def test_text_postgresql_cannot_hold_is_invalid_argument_before_anything_is_written(pg_schema):
    from services.consensus.escalations_pg import UnstorableText

    store = open_pg(pg_schema)
    try:
        record = store.record_decision(tally(), case())
        with pytest.raises(UnstorableText, match="NUL") as raised:
            store.resolve(record.id, "N", "ana", "a\x00b")
        assert raised.value.code.name == "INVALID_ARGUMENT"
        assert store.get(record.id).state == "pending"
    finally:
        store.close()


@pytest.mark.parametrize("url, said", [
    ("postgresql://nobody-here@127.0.0.1:5432/test", 'role "nobody-here" does not exist'),
    ("postgresql://postgres:secret-pw@127.0.0.1:5432/no_such_db", 'database "no_such_db" does not exist'),
    ("postgresql://postgres@127.0.0.1:1/test", "127.0.0.1"),
])
def test_a_database_that_cannot_be_used_stops_the_consensus_at_start_naming_the_key(tmp_path, url, said):
    require_postgres()
    path = write_config(tmp_path, body=f"fleet:\n  m: {{task: text-generation}}\nstate:\n  database_url: {url}\n")
    result = subprocess.run([sys.executable, "-m", "services.consensus", "--config", str(path)], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "database_url" in text)
    assert f"{path}:{line}: state.database_url: cannot use PostgreSQL" in result.stderr
    assert said in result.stderr and "secret-pw" not in result.stderr


def test_a_reload_that_moves_the_review_queue_says_a_restart_is_needed(tmp_path):
    """The database is opened once; SIGHUP with a new `state:` logs which keys need a restart."""
    import json
    import os
    import signal

    from services.cli.supervisor import Mesh
    from services.common.config import load_config

    path = write_config(tmp_path, body="fleet:\n  m: {task: text-generation}\n")
    mesh = Mesh(load_config(path), log_dir=tmp_path / "logs", services=("consensus",))
    mesh.start(timeout_s=60)
    try:
        path.write_text(path.read_text() + "state:\n  database_url: postgresql://postgres@127.0.0.1:5432/test\n")
        os.kill(mesh.processes["consensus"].process.pid, signal.SIGHUP)
        deadline, seen = time.monotonic() + 20, []
        while time.monotonic() < deadline and not seen:
            lines = mesh.processes["consensus"].log_path.read_text(errors="replace").splitlines()
            seen = [json.loads(line) for line in lines if "restart the consensus" in line]
            time.sleep(0.1)
        assert seen and seen[0].get("keys") == ["state"], seen
    finally:
        mesh.stop()


@pytest.mark.parametrize("service, key", [("consensus", "database_url_env"), ("router", "redis_url_env")])
def test_a_url_variable_the_service_needs_but_lacks_stops_it_at_start_naming_the_key(tmp_path, service, key):
    """The same file loads in every service; the one that needs the URL refuses to start without it."""
    import os

    path = write_config(tmp_path, body=f"fleet:\n  m: {{task: text-generation}}\nstate:\n  {key}: TEST_MIRADOR_UNSET_URL\n")
    environment = {k: v for k, v in os.environ.items() if k != "TEST_MIRADOR_UNSET_URL"}
    result = subprocess.run([sys.executable, "-m", f"services.{service}", "--config", str(path)], cwd=REPO,
                            capture_output=True, text=True, timeout=60, env=environment)
    assert result.returncode == 2, result.stderr
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if key in text)
    assert (f"{path}:{line}: state.{key}: the environment variable TEST_MIRADOR_UNSET_URL is not set or empty"
            in result.stderr), result.stderr


def test_a_url_from_the_environment_reaches_the_review_queue(pg_schema, tmp_path):
    import os

    path = write_config(tmp_path, body=f"fleet:\n  m: {{task: text-generation}}\nstate:\n"
                                       f"  database_url_env: TEST_MIRADOR_DB_URL\n  database_schema: {pg_schema}\n")
    from services.cli.supervisor import Mesh
    from services.common.config import load_config

    os.environ["TEST_MIRADOR_DB_URL"] = POSTGRES_URL
    try:
        mesh = Mesh(load_config(path), log_dir=tmp_path / "logs", services=("consensus",))
        mesh.start(timeout_s=60)
        mesh.stop()
    finally:
        del os.environ["TEST_MIRADOR_DB_URL"]
    with psycopg.connect(POSTGRES_URL) as connection:
        assert connection.execute(f"SELECT count(*) FROM {pg_schema}.schema_migrations").fetchone()[0] == 2

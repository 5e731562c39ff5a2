"""The review queue and the consensus counters, in one SQL database: a SQLite file by
default, PostgreSQL when `state.database_url` is set (escalations_pg.py). No gRPC here.

Durability: SQLite runs in WAL mode with `synchronous=FULL`, so a transaction is on disk
(the WAL fsync'd) when `commit()` returns; PostgreSQL's commit is durable by its own
default (`synchronous_commit=on`). The servicer records a decision, its escalation and
its counters in ONE transaction and sends the verdict only after that commit, so an
escalation id a client has seen always survives a crash (kill -9, power loss); a crash
before the commit leaves nothing half-written.

The schema is versioned (`MIGRATIONS`, one entry per step and dialect, recorded in
`schema_migrations`); every start applies the missing steps in one transaction that no
other process migrates in at the same time.

Votes, messages and verdicts are stored as JSON (the servicer converts its messages to
plain dicts); resolved cases are kept for audit, for good or until `purge_resolved` deletes
those resolved before a cut-off (`services.consensus.escalation_retention_days`).

Why one module of ~510 lines: the queries are written once for both backends, and the schema,
its migrations and the store that runs them are one contract; escalations_pg.py holds only what
PostgreSQL does differently.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import uuid
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from services.common.migrations import Migration, SchemaTooNew, apply_migrations

PENDING, RESOLVED = "pending", "resolved"
STATES = (PENDING, RESOLVED)


_SQLITE_V1 = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS escalations (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,  -- insertion order: newest = highest
    id          TEXT NOT NULL UNIQUE,
    created_at  REAL NOT NULL,                      -- unix seconds
    route       TEXT NOT NULL,
    request_id  TEXT NOT NULL,
    messages    TEXT NOT NULL,                      -- JSON list of {role, content}
    options     TEXT NOT NULL,                      -- JSON list of strings
    votes       TEXT NOT NULL,                      -- JSON list of vote dicts
    verdict     TEXT NOT NULL,                      -- JSON verdict dict
    state       TEXT NOT NULL CHECK (state IN ('pending', 'resolved')),
    resolution  TEXT NOT NULL DEFAULT '',
    reviewer    TEXT NOT NULL DEFAULT '',
    note        TEXT NOT NULL DEFAULT '',
    resolved_at REAL
);
CREATE INDEX IF NOT EXISTS escalations_by_state ON escalations (state, seq);
CREATE INDEX IF NOT EXISTS escalations_by_request ON escalations (route, request_id);
CREATE TABLE IF NOT EXISTS route_stats (
    route              TEXT PRIMARY KEY,
    decisions          INTEGER NOT NULL DEFAULT 0,
    escalations        INTEGER NOT NULL DEFAULT 0,
    resolved           INTEGER NOT NULL DEFAULT 0,
    reviewer_overrides INTEGER NOT NULL DEFAULT 0,
    primary_answered   INTEGER NOT NULL DEFAULT 0,
    primary_overturned INTEGER NOT NULL DEFAULT 0,
    no_answer          INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS model_stats (
    route      TEXT NOT NULL,
    model      TEXT NOT NULL,
    asked      INTEGER NOT NULL DEFAULT 0,
    answered   INTEGER NOT NULL DEFAULT 0,
    failed     INTEGER NOT NULL DEFAULT 0,
    as_primary INTEGER NOT NULL DEFAULT 0,
    agreement  REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (route, model)
)
"""

# The same tables in PostgreSQL's words: an identity column for the insertion order, 64-bit
# counters, double precision for times and agreement sums. JSON stays TEXT so that one
# decoder reads both backends.
_POSTGRESQL_V1 = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS escalations (
    seq         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id          TEXT NOT NULL UNIQUE,
    created_at  DOUBLE PRECISION NOT NULL,
    route       TEXT NOT NULL,
    request_id  TEXT NOT NULL,
    messages    TEXT NOT NULL,
    options     TEXT NOT NULL,
    votes       TEXT NOT NULL,
    verdict     TEXT NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('pending', 'resolved')),
    resolution  TEXT NOT NULL DEFAULT '',
    reviewer    TEXT NOT NULL DEFAULT '',
    note        TEXT NOT NULL DEFAULT '',
    resolved_at DOUBLE PRECISION
);
CREATE INDEX IF NOT EXISTS escalations_by_state ON escalations (state, seq);
CREATE INDEX IF NOT EXISTS escalations_by_request ON escalations (route, request_id);
CREATE TABLE IF NOT EXISTS route_stats (
    route              TEXT PRIMARY KEY,
    decisions          BIGINT NOT NULL DEFAULT 0,
    escalations        BIGINT NOT NULL DEFAULT 0,
    resolved           BIGINT NOT NULL DEFAULT 0,
    reviewer_overrides BIGINT NOT NULL DEFAULT 0,
    primary_answered   BIGINT NOT NULL DEFAULT 0,
    primary_overturned BIGINT NOT NULL DEFAULT 0,
    no_answer          BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS model_stats (
    route      TEXT NOT NULL,
    model      TEXT NOT NULL,
    asked      BIGINT NOT NULL DEFAULT 0,
    answered   BIGINT NOT NULL DEFAULT 0,
    failed     BIGINT NOT NULL DEFAULT 0,
    as_primary BIGINT NOT NULL DEFAULT 0,
    agreement  DOUBLE PRECISION NOT NULL DEFAULT 0,
    PRIMARY KEY (route, model)
)
"""

# v2: a request id escalates once per route. Two replicas (or a retry racing its original)
# deciding the same request_id at once used to store two cases; now the second insert finds
# the first. Databases written before v2 may hold such twins: the later ones are kept (never
# deleted) with `#dup-<seq>` appended to their request_id, so the replay still finds the first.
_REQUEST_ONCE = ("CREATE UNIQUE INDEX escalations_request_once ON escalations (route, request_id)",
                 "DROP INDEX IF EXISTS escalations_by_request")
MIGRATIONS = (
    Migration(1, "review queue and counters", tuple(_SQLITE_V1.split(";")), tuple(_POSTGRESQL_V1.split(";"))),
    Migration(2, "one case per (route, request_id)", (
        """UPDATE escalations SET request_id = request_id || '#dup-' || seq
           WHERE seq NOT IN (SELECT MIN(seq) FROM escalations GROUP BY route, request_id)""",
        *_REQUEST_ONCE,
    ), _REQUEST_ONCE),
)
SCHEMA_VERSION = MIGRATIONS[-1].version


class StoreError(Exception):
    """Base of the store's errors (the servicer maps each to a status)."""


class UnknownEscalation(StoreError):
    pass


class AlreadyResolved(StoreError):
    def __init__(self, record: "EscalationRecord"):
        super().__init__(f"escalation {record.id} was resolved already")
        self.record = record


class InvalidResolution(StoreError):
    def __init__(self, resolution: str, options: Sequence[str]):
        super().__init__(f"resolution {resolution!r} is not one of the options")
        self.resolution = resolution
        self.options = list(options)


@dataclass(frozen=True)
class EscalationRecord:
    id: str
    created_at: float
    route: str
    request_id: str
    messages: list[dict[str, Any]]
    options: list[str]
    votes: list[dict[str, Any]]
    verdict: dict[str, Any]
    state: str = PENDING
    resolution: str = ""
    reviewer: str = ""
    note: str = ""
    resolved_at: float | None = None


@dataclass(frozen=True)
class ModelTally:
    """One model's part in one decision, for the counters."""

    model: str
    answered: bool
    primary: bool
    agreement: float | None  # with the verdict, in [0, 1]; None when not comparable


@dataclass(frozen=True)
class DecisionTally:
    """What one decision adds to the counters."""

    route: str
    models: Sequence[ModelTally]
    escalated: bool
    primary_answered: bool
    primary_overturned: bool
    no_answer: bool


@dataclass
class ModelCounters:
    model: str
    asked: int = 0
    answered: int = 0
    failed: int = 0
    as_primary: int = 0
    agreement: float = 0.0

    @property
    def agreement_rate(self) -> float:
        return self.agreement / self.answered if self.answered else 0.0


@dataclass
class Stats:
    route: str = ""
    decisions: int = 0
    escalations: int = 0
    resolved: int = 0
    reviewer_overrides: int = 0
    primary_answered: int = 0
    primary_overturned: int = 0
    no_answer: int = 0
    models: list[ModelCounters] = field(default_factory=list)
    since: float = 0.0

    @property
    def overturn_rate(self) -> float:
        return self.primary_overturned / self.primary_answered if self.primary_answered else 0.0


class EscalationStore:
    """The review queue and counters over one SQL database. The queries are written once in
    the `?` style; a backend supplies the connection (`_transaction`, `_read`), its dialect
    for the migrations, and `close`. `SqliteEscalationStore` is the embedded default;
    `escalations_pg.PostgresEscalationStore` is the one replicas share."""

    dialect = ""

    def _transaction(self) -> AbstractContextManager[Any]:
        """A write transaction (committed durably on a clean exit, rolled back on an exception)."""
        raise NotImplementedError

    def _read(self) -> AbstractContextManager[Any]:
        raise NotImplementedError

    def _migration_transaction(self) -> AbstractContextManager[Any]:
        """A transaction no other process migrates in at the same time."""
        return self._transaction()

    def close(self) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ schema

    def _migrate(self) -> list[int]:
        """Applies the migrations this database lacks, in one transaction; returns their
        versions (empty when another process, or an earlier start, applied them)."""
        with self._migration_transaction() as db:
            try:
                applied = apply_migrations(db, self.dialect, MIGRATIONS)
            except SchemaTooNew as exc:
                raise StoreError(f"the review queue: {exc}") from None
            db.execute("INSERT INTO meta (key, value) VALUES ('created_at', ?) ON CONFLICT (key) DO NOTHING",
                       (repr(time.time()),))
            db.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?) "
                       "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (str(SCHEMA_VERSION),))
        return applied

    def schema_versions(self) -> list[tuple[int, str]]:
        """(version, description) of every migration applied, oldest first."""
        with self._read() as db:
            rows = db.execute("SELECT version, description FROM schema_migrations ORDER BY version").fetchall()
        return [(int(row["version"]), row["description"]) for row in rows]

    # ------------------------------------------------------------------ decisions

    def record_decision(self, tally: DecisionTally, escalation: dict[str, Any] | None = None,
                        now: float | None = None) -> EscalationRecord | None:
        """Adds one decision to the counters and, when `escalation` is given (route,
        request_id, messages, options, votes, verdict), stores the case — one transaction,
        committed (durably) before this returns. Returns the stored case.

        A request id escalates once per route: when the case is there already (a retry that
        raced its original, possibly on another replica), nothing is counted again and the
        stored case is returned."""
        now = time.time() if now is None else now
        record = None
        if escalation is not None:
            record = EscalationRecord(
                id=new_escalation_id(now), created_at=now, route=escalation["route"],
                request_id=escalation["request_id"], messages=list(escalation["messages"]),
                options=list(escalation["options"]), votes=list(escalation["votes"]),
                verdict={**escalation["verdict"]},
            )
            record.verdict["escalation_id"] = record.id
            record.verdict["escalated"] = True
        try:
            with self._transaction() as db:
                if record is not None:  # first: a twin stops the transaction before anything is counted
                    inserted = db.execute(
                        """INSERT INTO escalations (id, created_at, route, request_id, messages, options, votes,
                                                    verdict, state) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
                           ON CONFLICT (route, request_id) DO NOTHING""",
                        (record.id, record.created_at, record.route, record.request_id, _json(record.messages),
                         _json(record.options), _json(record.votes), _json(record.verdict), PENDING),
                    ).rowcount
                    if inserted == 0:
                        raise _StoredAlready()
                # Two upserts: the model rows (in name order), then the shared route row. Concurrent
                # decisions (other threads, other replicas) hold each row's lock briefly and always
                # take the locks in the same order, so they never deadlock.
                if tally.models:
                    rows = _model_rows(tally)
                    db.execute(
                        f"""INSERT INTO model_stats (route, model, asked, answered, failed, as_primary, agreement)
                            VALUES {", ".join(["(?, ?, ?, ?, ?, ?, ?)"] * len(rows))}
                            ON CONFLICT (route, model) DO UPDATE SET asked = model_stats.asked + excluded.asked,
                                answered = model_stats.answered + excluded.answered,
                                failed = model_stats.failed + excluded.failed,
                                as_primary = model_stats.as_primary + excluded.as_primary,
                                agreement = model_stats.agreement + excluded.agreement""",
                        [value for row in rows for value in row],
                    )
                db.execute(
                    """INSERT INTO route_stats (route, decisions, escalations, primary_answered, primary_overturned,
                                                no_answer) VALUES (?, 1, ?, ?, ?, ?)
                       ON CONFLICT (route) DO UPDATE SET decisions = route_stats.decisions + 1,
                           escalations = route_stats.escalations + excluded.escalations,
                           primary_answered = route_stats.primary_answered + excluded.primary_answered,
                           primary_overturned = route_stats.primary_overturned + excluded.primary_overturned,
                           no_answer = route_stats.no_answer + excluded.no_answer""",
                    (tally.route, int(tally.escalated), int(tally.primary_answered), int(tally.primary_overturned),
                     int(tally.no_answer)),
                )
        except _StoredAlready:
            stored = self.find_request(record.route, record.request_id)
            if stored is None:  # cannot happen: the unique index found it
                raise StoreError(f"request {record.request_id!r} conflicts with a case that cannot be read") from None
            return stored
        return record

    # ------------------------------------------------------------------ review queue

    def list(self, state: str | None = None, limit: int = 50) -> list[EscalationRecord]:
        """Newest first; `state` None lists every state."""
        if state is not None and state not in STATES:
            raise ValueError(f"state must be one of {STATES}")
        query = "SELECT * FROM escalations"
        params: tuple = ()
        if state is not None:
            query += " WHERE state = ?"
            params = (state,)
        query += " ORDER BY seq DESC LIMIT ?"
        with self._read() as db:
            rows = db.execute(query, (*params, int(limit))).fetchall()
        return [_record(row) for row in rows]

    def find_request(self, route: str, request_id: str) -> EscalationRecord | None:
        """The case a request already escalated on this route, if any (retries replay it)."""
        with self._read() as db:
            row = db.execute("SELECT * FROM escalations WHERE route = ? AND request_id = ?",
                             (route, request_id)).fetchone()
        return _record(row) if row is not None else None

    def get(self, escalation_id: str) -> EscalationRecord:
        with self._read() as db:
            row = db.execute("SELECT * FROM escalations WHERE id = ?", (escalation_id,)).fetchone()
        if row is None:
            raise UnknownEscalation(escalation_id)
        return _record(row)

    def resolve(self, escalation_id: str, resolution: str, reviewer: str, note: str = "",
                now: float | None = None) -> EscalationRecord:
        """Records the reviewer's decision once. Raises UnknownEscalation, AlreadyResolved,
        or InvalidResolution (the case had options and `resolution` is none of them)."""
        now = time.time() if now is None else now
        with self._transaction() as db:
            row = db.execute("SELECT * FROM escalations WHERE id = ?", (escalation_id,)).fetchone()
            if row is None:
                raise UnknownEscalation(escalation_id)
            record = _record(row)
            if record.state == RESOLVED:
                raise AlreadyResolved(record)
            if record.options and resolution not in record.options:
                raise InvalidResolution(resolution, record.options)
            updated = db.execute(
                """UPDATE escalations SET state = ?, resolution = ?, reviewer = ?, note = ?, resolved_at = ?
                   WHERE id = ? AND state = ?""",
                (RESOLVED, resolution, reviewer, note, now, escalation_id, PENDING),
            ).rowcount
            if updated == 0:  # another replica's reviewer resolved it between our read and our write
                raise AlreadyResolved(_record(db.execute("SELECT * FROM escalations WHERE id = ?",
                                                         (escalation_id,)).fetchone()))
            override = resolution != record.verdict.get("answer", "")
            db.execute("INSERT INTO route_stats (route) VALUES (?) ON CONFLICT (route) DO NOTHING", (record.route,))
            db.execute("UPDATE route_stats SET resolved = resolved + 1, reviewer_overrides = reviewer_overrides + ? "
                       "WHERE route = ?", (int(override), record.route))
            row = db.execute("SELECT * FROM escalations WHERE id = ?", (escalation_id,)).fetchone()
        return _record(row)

    def purge_resolved(self, older_than_s: float, now: float | None = None) -> int:
        """Deletes the cases resolved more than `older_than_s` ago (their conversations, votes and
        resolutions); pending cases are never deleted, and the counters keep counting them.
        Returns how many were deleted."""
        cutoff = (time.time() if now is None else now) - older_than_s
        with self._transaction() as db:
            return db.execute("DELETE FROM escalations WHERE state = ? AND resolved_at < ?", (RESOLVED, cutoff)).rowcount

    # ------------------------------------------------------------------ counters

    def stats(self, route: str = "") -> Stats:
        where, params = ("WHERE route = ?", (route,)) if route else ("", ())
        with self._read() as db:
            totals = db.execute(
                f"""SELECT COALESCE(SUM(decisions), 0) AS decisions, COALESCE(SUM(escalations), 0) AS escalations,
                           COALESCE(SUM(resolved), 0) AS resolved, COALESCE(SUM(reviewer_overrides), 0) AS overrides,
                           COALESCE(SUM(primary_answered), 0) AS answered,
                           COALESCE(SUM(primary_overturned), 0) AS overturned, COALESCE(SUM(no_answer), 0) AS none
                    FROM route_stats {where}""", params).fetchone()
            models = db.execute(
                f"""SELECT model, SUM(asked) AS asked, SUM(answered) AS answered, SUM(failed) AS failed,
                           SUM(as_primary) AS as_primary, SUM(agreement) AS agreement
                    FROM model_stats {where} GROUP BY model ORDER BY model""", params).fetchall()
            since = db.execute("SELECT value FROM meta WHERE key = 'created_at'").fetchone()
        return Stats(
            route=route, decisions=int(totals["decisions"]), escalations=int(totals["escalations"]),
            resolved=int(totals["resolved"]), reviewer_overrides=int(totals["overrides"]),
            primary_answered=int(totals["answered"]), primary_overturned=int(totals["overturned"]),
            no_answer=int(totals["none"]),
            models=[ModelCounters(r["model"], int(r["asked"]), int(r["answered"]), int(r["failed"]),
                                  int(r["as_primary"]), float(r["agreement"])) for r in models],
            since=float(since["value"]) if since else 0.0,
        )


class SqliteEscalationStore(EscalationStore):
    """The embedded default: one file, one connection behind a lock (calls are short; the
    servicer runs them in a worker thread so the event loop never waits on the disk).
    `BEGIN IMMEDIATE` also serialises other processes on the same file, migrations included."""

    dialect = "sqlite"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError(f"{self.path}: SQLite refused WAL mode (got {mode}); put the file on a local disk")
        self._db.execute("PRAGMA synchronous=FULL")  # WAL fsync'd at every commit
        self.migrated = self._migrate()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            yield self._db

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def integrity_ok(self) -> bool:
        with self._lock:
            return self._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


class _StoredAlready(Exception):
    """Rolls back a decision whose case another call stored first."""


def _model_rows(tally: DecisionTally) -> list[tuple]:
    """One (route, model, asked, answered, failed, as_primary, agreement) per model, in name
    order; a model named twice in one decision is summed (one upsert may touch a row once)."""
    rows: dict[str, list] = {}
    for m in tally.models:
        row = rows.setdefault(m.model, [tally.route, m.model, 0, 0, 0, 0, 0.0])
        row[2] += 1
        row[3] += int(m.answered)
        row[4] += int(not m.answered)
        row[5] += int(m.primary)
        row[6] += float(m.agreement or 0.0) if m.answered else 0.0
    return [tuple(rows[name]) for name in sorted(rows)]


def new_escalation_id(now: float) -> str:
    """`esc-` + the time in hex (ids of one store sort by creation) + 8 random hex digits."""
    return f"esc-{int(now * 1000):011x}-{uuid.uuid4().hex[:8]}"


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _record(row: Any) -> EscalationRecord:  # sqlite3.Row or a psycopg dict row
    return EscalationRecord(
        id=row["id"], created_at=row["created_at"], route=row["route"], request_id=row["request_id"],
        messages=json.loads(row["messages"]), options=json.loads(row["options"]), votes=json.loads(row["votes"]),
        verdict=json.loads(row["verdict"]), state=row["state"], resolution=row["resolution"],
        reviewer=row["reviewer"], note=row["note"], resolved_at=row["resolved_at"],
    )

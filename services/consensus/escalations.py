"""The review queue and the consensus counters, in one SQLite file. No gRPC here.

Durability: the database runs in WAL mode with `synchronous=FULL`, so a transaction is
on disk (the WAL fsync'd) when `commit()` returns. The servicer records a decision,
its escalation and its counters in ONE transaction and sends the verdict only after
that commit, so an escalation id a client has seen always survives a crash (kill -9,
power loss); a crash before the commit leaves nothing half-written.

Votes, messages and verdicts are stored as JSON (the servicer converts its messages to
plain dicts); resolved cases are kept for audit.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

PENDING, RESOLVED = "pending", "resolved"
STATES = (PENDING, RESOLVED)
SCHEMA_VERSION = 1

_SCHEMA = """
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
);
"""


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
    """Thread-safe: one connection behind a lock (calls are short; the servicer runs them
    in a worker thread so the event loop never waits on the disk)."""

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
        self._create_schema()

    # ------------------------------------------------------------------ plumbing

    class _Tx:
        def __init__(self, store: "EscalationStore"):
            self.store = store

        def __enter__(self) -> sqlite3.Connection:
            self.store._lock.acquire()
            try:
                self.store._db.execute("BEGIN IMMEDIATE")
            except BaseException:
                self.store._lock.release()
                raise
            return self.store._db

        def __exit__(self, exc_type, exc, tb) -> None:
            try:
                self.store._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
            finally:
                self.store._lock.release()

    def _transaction(self) -> "_Tx":
        return EscalationStore._Tx(self)

    def _create_schema(self) -> None:
        with self._lock:
            self._db.executescript(_SCHEMA)  # executescript commits on its own
        with self._transaction() as db:
            db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('created_at', ?)", (repr(time.time()),))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def integrity_ok(self) -> bool:
        with self._lock:
            return self._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

    # ------------------------------------------------------------------ decisions

    def record_decision(self, tally: DecisionTally, escalation: dict[str, Any] | None = None,
                        now: float | None = None) -> EscalationRecord | None:
        """Adds one decision to the counters and, when `escalation` is given (route,
        request_id, messages, options, votes, verdict), stores the case — one transaction,
        committed (fsync'd) before this returns. Returns the stored case."""
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
        with self._transaction() as db:
            db.execute("INSERT OR IGNORE INTO route_stats (route) VALUES (?)", (tally.route,))
            db.execute(
                """UPDATE route_stats SET decisions = decisions + 1, escalations = escalations + ?,
                       primary_answered = primary_answered + ?, primary_overturned = primary_overturned + ?,
                       no_answer = no_answer + ? WHERE route = ?""",
                (int(tally.escalated), int(tally.primary_answered), int(tally.primary_overturned),
                 int(tally.no_answer), tally.route),
            )
            for m in tally.models:
                db.execute("INSERT OR IGNORE INTO model_stats (route, model) VALUES (?, ?)", (tally.route, m.model))
                db.execute(
                    """UPDATE model_stats SET asked = asked + 1, answered = answered + ?, failed = failed + ?,
                           as_primary = as_primary + ?, agreement = agreement + ? WHERE route = ? AND model = ?""",
                    (int(m.answered), int(not m.answered), int(m.primary),
                     float(m.agreement or 0.0) if m.answered else 0.0, tally.route, m.model),
                )
            if record is not None:
                db.execute(
                    """INSERT INTO escalations (id, created_at, route, request_id, messages, options, votes,
                                                verdict, state) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                    (record.id, record.created_at, record.route, record.request_id, _json(record.messages),
                     _json(record.options), _json(record.votes), _json(record.verdict), PENDING),
                )
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
        with self._lock:
            rows = self._db.execute(query, (*params, int(limit))).fetchall()
        return [_record(row) for row in rows]

    def find_request(self, route: str, request_id: str) -> EscalationRecord | None:
        """The case a request already escalated on this route, if any (retries replay it)."""
        with self._lock:
            row = self._db.execute("SELECT * FROM escalations WHERE route = ? AND request_id = ? ORDER BY seq LIMIT 1",
                                   (route, request_id)).fetchone()
        return _record(row) if row is not None else None

    def get(self, escalation_id: str) -> EscalationRecord:
        with self._lock:
            row = self._db.execute("SELECT * FROM escalations WHERE id = ?", (escalation_id,)).fetchone()
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
            db.execute(
                """UPDATE escalations SET state = ?, resolution = ?, reviewer = ?, note = ?, resolved_at = ?
                   WHERE id = ? AND state = ?""",
                (RESOLVED, resolution, reviewer, note, now, escalation_id, PENDING),
            )
            override = resolution != record.verdict.get("answer", "")
            db.execute("INSERT OR IGNORE INTO route_stats (route) VALUES (?)", (record.route,))
            db.execute("UPDATE route_stats SET resolved = resolved + 1, reviewer_overrides = reviewer_overrides + ? "
                       "WHERE route = ?", (int(override), record.route))
            row = db.execute("SELECT * FROM escalations WHERE id = ?", (escalation_id,)).fetchone()
        return _record(row)

    # ------------------------------------------------------------------ counters

    def stats(self, route: str = "") -> Stats:
        where, params = ("WHERE route = ?", (route,)) if route else ("", ())
        with self._lock:
            totals = self._db.execute(
                f"""SELECT COALESCE(SUM(decisions), 0), COALESCE(SUM(escalations), 0), COALESCE(SUM(resolved), 0),
                           COALESCE(SUM(reviewer_overrides), 0), COALESCE(SUM(primary_answered), 0),
                           COALESCE(SUM(primary_overturned), 0), COALESCE(SUM(no_answer), 0)
                    FROM route_stats {where}""", params).fetchone()
            models = self._db.execute(
                f"""SELECT model, SUM(asked), SUM(answered), SUM(failed), SUM(as_primary), SUM(agreement)
                    FROM model_stats {where} GROUP BY model ORDER BY model""", params).fetchall()
            since = self._db.execute("SELECT value FROM meta WHERE key = 'created_at'").fetchone()
        return Stats(
            route=route, decisions=totals[0], escalations=totals[1], resolved=totals[2],
            reviewer_overrides=totals[3], primary_answered=totals[4], primary_overturned=totals[5],
            no_answer=totals[6],
            models=[ModelCounters(r[0], int(r[1]), int(r[2]), int(r[3]), int(r[4]), float(r[5])) for r in models],
            since=float(since[0]) if since else 0.0,
        )


def new_escalation_id(now: float) -> str:
    """`esc-` + the time in hex (ids of one store sort by creation) + 8 random hex digits."""
    return f"esc-{int(now * 1000):011x}-{uuid.uuid4().hex[:8]}"


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _record(row: sqlite3.Row) -> EscalationRecord:
    return EscalationRecord(
        id=row["id"], created_at=row["created_at"], route=row["route"], request_id=row["request_id"],
        messages=json.loads(row["messages"]), options=json.loads(row["options"]), votes=json.loads(row["votes"]),
        verdict=json.loads(row["verdict"]), state=row["state"], resolution=row["resolution"],
        reviewer=row["reviewer"], note=row["note"], resolved_at=row["resolved_at"],
    )

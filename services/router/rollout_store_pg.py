"""Rollout decisions (rolled back, promoted) in PostgreSQL when `state.database_url` is set,
so every router replica serves the same versions: a decision any replica makes (its own
judgement or an operator's) is written here, and the others adopt it within
`REFRESH_S` (router/server.py polls `load`). Same interface as `RolloutStateFile`.

Judging stays per replica: each router judges the calls it sees and may roll back on its own;
a rollback then holds for all of them.
"""

from __future__ import annotations

import logging

from services.common.errors import ServiceError
from services.common.logs import log_event
from services.common.migrations import Migration, SchemaTooNew, apply_migrations
from services.common.postgres import PostgresDatabase, where
from services.common.state_settings import StateSettings

log = logging.getLogger("mirador.router.rollouts")
REFRESH_S = 2.0

MIGRATIONS = (
    Migration(1, "rollout decisions", sqlite=(), postgresql=("""
        CREATE TABLE IF NOT EXISTS rollout_decisions (
            candidate  TEXT PRIMARY KEY,        -- MODEL@VERSION
            state      TEXT NOT NULL CHECK (state IN ('active', 'rolled_back', 'promoted')),
            reason     TEXT NOT NULL DEFAULT '',
            changed_at TEXT                     -- RFC 3339, as the rollout reports it
        )""",)),
)


class RolloutStateDatabase:
    def __init__(self, settings: StateSettings):
        self.database = PostgresDatabase(settings, "mirador-router", "the rollout decisions")
        self.path = f"{where(settings.database_url)} schema {settings.database_schema}"  # for log lines
        try:
            with self.database.migration_transaction() as db:
                self.migrated = apply_migrations(db, "postgresql", MIGRATIONS, table="rollout_schema_migrations")
        except SchemaTooNew as exc:
            self.database.close()
            raise RuntimeError(f"the rollout decisions: {exc}") from None
        except BaseException:
            self.database.close()
            raise

    def load(self) -> dict[str, dict]:
        """{"MODEL@VERSION": {"state", "reason", "changed_at"}}; {} (logged) when the database cannot answer."""
        try:
            with self.database.read() as db:
                rows = db.execute("SELECT candidate, state, reason, changed_at FROM rollout_decisions").fetchall()
        except ServiceError as exc:
            log_event(log, "rollout decisions unreadable; keeping the ones this router has", logging.ERROR,
                      database=self.path, error=exc.message)
            return {}
        return {row["candidate"]: {"state": row["state"], "reason": row["reason"], "changed_at": row["changed_at"]}
                for row in rows}

    def save(self, key: str, entry: dict) -> None:
        """Raises ServiceError (UNAVAILABLE) when the database cannot take it; the caller logs it."""
        with self.database.transaction() as db:
            db.execute("""INSERT INTO rollout_decisions (candidate, state, reason, changed_at) VALUES (?, ?, ?, ?)
                          ON CONFLICT (candidate) DO UPDATE SET state = excluded.state, reason = excluded.reason,
                              changed_at = excluded.changed_at""",
                       (key, entry["state"], entry.get("reason") or "", entry.get("changed_at")))

    def close(self) -> None:
        self.database.close()

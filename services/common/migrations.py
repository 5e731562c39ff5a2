"""Versioned schema migrations, for the SQL stores of any service (SQLite or PostgreSQL).

A store lists its `Migration`s, oldest first; on start it opens a transaction that no other
process migrates in at the same time (SQLite: `BEGIN IMMEDIATE`; PostgreSQL: an advisory
lock, postgres.py) and calls `apply_migrations`, which applies the missing steps and records
each in the store's migrations table. Kept free of psycopg: SQLite-only processes never load it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence


class SchemaTooNew(Exception):
    """The database was migrated by a newer Mirador than this one."""


@dataclass(frozen=True)
class Migration:
    """One step of a schema, per dialect. Applied in order, once per database, each in the
    migration transaction that also records it (see `apply_migrations`)."""

    version: int
    description: str
    sqlite: tuple[str, ...]
    postgresql: tuple[str, ...]


def apply_migrations(db: Any, dialect: str, migrations: Sequence[Migration], table: str = "schema_migrations") -> list[int]:
    """Applies the migrations `db` (a connection in the caller's migration transaction, `?`
    placeholders) lacks; returns their versions. Shared by SQLite and PostgreSQL stores."""
    db.execute(f"""CREATE TABLE IF NOT EXISTS {table} (
                       version     INTEGER PRIMARY KEY,
                       description TEXT NOT NULL,
                       applied_at  DOUBLE PRECISION NOT NULL)""")
    done = {int(row["version"]) for row in db.execute(f"SELECT version FROM {table}").fetchall()}
    latest = migrations[-1].version
    if done and max(done) > latest:
        raise SchemaTooNew(f"the schema ({table}) is at version {max(done)}, newer than this Mirador's {latest}; "
                           "run the newer Mirador (or a fresh database)")
    applied = []
    for migration in migrations:
        if migration.version in done:
            continue
        for statement in getattr(migration, dialect):
            if statement.strip():
                db.execute(statement)
        db.execute(f"INSERT INTO {table} (version, description, applied_at) VALUES (?, ?, ?)",
                   (migration.version, migration.description, time.time()))
        applied.append(migration.version)
    return applied

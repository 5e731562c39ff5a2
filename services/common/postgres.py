"""PostgreSQL for the state replicas share (`state.database_url`): a psycopg 3 pool and
versioned migrations, used by the consensus review queue and the router's rollout
decisions. No service's tables here; each store brings its own migrations.

Every pooled connection runs with the configured schema as `search_path` and
`statement_timeout`, and is checked before each use (without a round trip: a connection
the server closed has something to read; dead ones are replaced at once), so a restarted
server costs the calls in flight (UNAVAILABLE, with a sentence) and not the ones after.
Connections are in autocommit mode: a read is one statement, one round trip; a write is an
explicit transaction. Queries are written in the `?` style (as for SQLite) and translated here.

Migrations run in one transaction holding a transaction-level advisory lock named after
the schema (one lock for every store in it, so that two never create the schema at once):
replicas that start together queue on it, the first migrates, the others find every
version applied and do nothing.
"""

from __future__ import annotations

import select
import zlib
from contextlib import contextmanager
from typing import Any, Iterator
from urllib.parse import urlsplit

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from services.common.errors import InvalidArgument, Unavailable
from services.common.state_settings import StateSettings, redact_url

CONNECT_TIMEOUT_S = 5
# A migration may wait for another replica's: longer than a statement may take.
MIGRATION_TIMEOUT_MS = 120_000


class DatabaseUnavailable(Unavailable):
    """PostgreSQL did not answer (down, restarting, too slow): the call fails UNAVAILABLE
    (the server's error mapping reads the status from `Unavailable`); nothing the call was
    about to write was committed."""


class UnstorableText(InvalidArgument):
    """PostgreSQL's text cannot hold NUL; the call fails INVALID_ARGUMENT before anything is written."""


class DatabaseUnreachable(Exception):
    """The database cannot be used at start (wrong URL, password, database, or none there)."""


class Connection:
    """A psycopg connection that takes `?` placeholders (the queries are shared with SQLite)."""

    def __init__(self, connection: psycopg.Connection):
        self.connection = connection

    def execute(self, query: str, params: tuple | list = ()) -> psycopg.Cursor:
        for value in params:
            if isinstance(value, str) and "\x00" in value:
                raise UnstorableText("a text field holds a NUL character (\\x00), which PostgreSQL cannot store; "
                                     "remove it from the request")
        return self.connection.execute(query.replace("?", "%s"), params)


def where(url: str) -> str:
    """`user@host:port/database` of a URL, for messages (never the password)."""
    parts = urlsplit(url)
    user = f"{parts.username}@" if parts.username else ""
    port = f":{parts.port}" if parts.port else ""
    return f"{user}{parts.hostname or 'localhost'}{port}{parts.path or '/'}"


class PostgresDatabase:
    """A pool of connections to one schema. `what` names the state in messages ("the review queue")."""

    def __init__(self, settings: StateSettings, application_name: str, what: str):
        missing = settings.missing_url("database_url")
        if missing:
            raise DatabaseUnreachable(f"{settings.key_of('database_url')}: {missing}")
        self.settings = settings
        self.schema = settings.database_schema
        self.what = what
        options = f"-c statement_timeout={settings.statement_timeout_ms} -c search_path={self.schema}"
        self._connect_kwargs: dict[str, Any] = {
            "options": options, "connect_timeout": CONNECT_TIMEOUT_S, "application_name": application_name,
            "row_factory": dict_row, "autocommit": True,
        }
        self._check_reachable()
        self.pool = ConnectionPool(
            settings.database_url, min_size=1, max_size=settings.pool_size, kwargs=self._connect_kwargs,
            timeout=max(2.0, settings.statement_timeout_ms / 1000),
            name=f"{application_name}@{self.schema}", open=False,
        )
        self.pool.open(wait=True, timeout=CONNECT_TIMEOUT_S * 2)

    def _check_reachable(self) -> None:
        """One plain connection first: the pool would only say it timed out, libpq says why."""
        try:
            with psycopg.connect(self.settings.database_url, **self._connect_kwargs) as connection:
                connection.execute("SELECT 1")
        except psycopg.Error as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise DatabaseUnreachable(
                f"cannot use PostgreSQL at {where(self.settings.database_url)} "
                f"({redact_url(self.settings.database_url)}): {reason}; check the URL, that the server runs and "
                "the password ($PGPASSWORD or ~/.pgpass)") from None

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A pooled connection in a transaction: committed on a clean exit, rolled back on an
        exception; connection trouble and timeouts become DatabaseUnavailable."""
        with self._errors_mapped(), self._connection() as connection, connection.transaction():
            yield Connection(connection)

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A pooled connection for reads, each statement on its own (autocommit)."""
        with self._errors_mapped(), self._connection() as connection:
            yield Connection(connection)

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection]:
        """A live pooled connection. Dead ones (the server restarted or cut them) are closed and
        the next one tried at once: the pool's own check would back off a second per dead one."""
        connection = self.pool.getconn()
        for _ in range(self.settings.pool_size):
            if _alive(connection):
                break
            connection.close()
            self.pool.putconn(connection)  # a closed connection is replaced by the pool, in the background
            connection = self.pool.getconn()
        try:
            yield connection
        finally:
            self.pool.putconn(connection)

    @contextmanager
    def _errors_mapped(self) -> Iterator[None]:
        """Connection trouble and timeouts become DatabaseUnavailable, with a sentence."""
        try:
            yield
        except PoolTimeout as exc:
            raise DatabaseUnavailable(f"no connection to {self.what}'s PostgreSQL at {where(self.settings.database_url)} "
                                      f"within {self.pool.timeout:g} s (server down or every connection busy); "
                                      "retry shortly") from exc
        except psycopg.errors.QueryCanceled as exc:
            raise DatabaseUnavailable(f"{self.what}'s PostgreSQL took longer than state.statement_timeout_ms "
                                      f"({self.settings.statement_timeout_ms} ms); nothing was written, retry") from exc
        except psycopg.OperationalError as exc:
            reason = " ".join(str(exc).split())
            raise DatabaseUnavailable(f"lost {self.what}'s PostgreSQL at {where(self.settings.database_url)} "
                                      f"({reason}); nothing was written, retry") from exc

    @contextmanager
    def migration_transaction(self) -> Iterator[Connection]:
        """A transaction no other process migrates this schema in at the same time."""
        with self.transaction() as db:
            db.connection.execute(sql.SQL("SET LOCAL statement_timeout = {}").format(MIGRATION_TIMEOUT_MS))
            db.connection.execute("SELECT pg_advisory_xact_lock(%s)", (migration_lock_key(self.schema),))
            db.connection.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema)))
            db.connection.execute(sql.SQL("SET LOCAL search_path TO {}").format(sql.Identifier(self.schema)))
            yield db

    def close(self) -> None:
        self.pool.close()


def _alive(connection: psycopg.Connection) -> bool:
    """Whether an idle pooled connection still works. An idle connection has nothing to read;
    when it has, the server closed it (restart, termination) or said something unexpected,
    and a real round trip decides."""
    if connection.closed or connection.broken:
        return False
    try:
        readable, _, _ = select.select([connection.fileno()], [], [], 0)
        if readable:
            ConnectionPool.check_connection(connection)
    except (psycopg.Error, OSError, ValueError):
        return False
    return True


def migration_lock_key(schema: str) -> int:
    """A stable 63-bit advisory-lock key per schema (replicas share it)."""
    return zlib.crc32(f"mirador migrations {schema}".encode()) | (0x4D49 << 32)

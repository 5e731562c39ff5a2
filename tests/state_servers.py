"""The real PostgreSQL and Redis the shared-state tests run against (issue 15).

PostgreSQL: 127.0.0.1:5432, trust auth, database `test` ($MIRADOR_TEST_DATABASE_URL picks
another); Redis: 127.0.0.1:6379 ($MIRADOR_TEST_REDIS_URL). Each test gets its own schema
or key prefix and removes it afterwards. Without a server the tests skip, except in CI
(`CI=true`), where a missing server is a failure: CI must not pass by testing nothing.
"""

from __future__ import annotations

import os
import uuid

import pytest

POSTGRES_URL = os.environ.get("MIRADOR_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("MIRADOR_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _missing(what: str, reason: str) -> None:
    message = f"{what} is not reachable ({reason})"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message}; CI runs the shared-state tests against real servers", pytrace=False)
    pytest.skip(message)


def require_postgres() -> str:
    import psycopg

    try:
        with psycopg.connect(POSTGRES_URL, connect_timeout=3) as connection:
            connection.execute("SELECT 1")
    except psycopg.Error as exc:
        _missing(f"PostgreSQL at {POSTGRES_URL}", " ".join(str(exc).split()))
    return POSTGRES_URL


def require_redis() -> str:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_timeout=3, socket_connect_timeout=3).ping()
    except redis.RedisError as exc:
        _missing(f"Redis at {REDIS_URL}", str(exc))
    return REDIS_URL


def new_schema_name() -> str:
    return f"test_{uuid.uuid4().hex[:12]}"


def drop_schema(schema: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(POSTGRES_URL, autocommit=True) as connection:
        connection.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def schema_exists(schema: str) -> bool:
    import psycopg

    with psycopg.connect(POSTGRES_URL) as connection:
        return connection.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone() is not None


def terminate_backends(application_name: str, timeout_s: float = 10.0) -> int:
    """What a server restart does to a client's connections: the server ends every session of
    `application_name` on the test database, and this returns once they are gone (the server
    has closed their sockets), with how many there were."""
    import time

    import psycopg

    query = ("SELECT pid FROM pg_stat_activity WHERE application_name = %s AND datname = current_database() "
             "AND pid <> pg_backend_pid()")
    with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
        pids = [row[0] for row in admin.execute(query, (application_name,)).fetchall()]
        for pid in pids:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            alive = {row[0] for row in admin.execute(query, (application_name,)).fetchall()}
            if not alive & set(pids):
                break
            time.sleep(0.02)
    return len(pids)


def drop_redis_prefix(prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        client.delete(*keys)


@pytest.fixture
def pg_schema():
    """A fresh schema name on the test server (created by the store's migration), dropped afterwards."""
    require_postgres()
    schema = new_schema_name()
    yield schema
    drop_schema(schema)


@pytest.fixture
def redis_prefix():
    """A fresh key prefix on the test Redis; its keys are deleted afterwards."""
    require_redis()
    prefix = f"test:{uuid.uuid4().hex[:12]}:"
    yield prefix
    drop_redis_prefix(prefix)

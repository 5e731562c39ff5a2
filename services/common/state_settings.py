"""`state:`: where replicas keep the state they share. Without the section every service
keeps its state to itself, as before (SQLite files, in-process sessions and buckets).

    state:
      database_url: postgresql://mirador@db.internal:5432/mirador   # review queue (consensus)
      database_schema: mirador        # created on first start; tests use one schema each
      statement_timeout_ms: 5000      # every SQL statement; past it the call fails UNAVAILABLE
      pool_size: 8                    # connections per process, at most
      redis_url: redis://cache.internal:6379/0   # router sessions and rate-limit buckets
      redis_prefix: "mirador:"        # every key starts with it
      redis_timeout_ms: 250           # one Redis command; past it Redis counts as unavailable
      rate_limit_without_redis: open  # open: admit while Redis is down; closed: refuse

A password belongs in the environment, not the file: libpq reads `PGPASSWORD` (and
`~/.pgpass`), so the URL can leave it out; or the whole URL comes from an environment
variable (a Kubernetes Secret): `database_url_env: NAME`, `redis_url_env: NAME` instead of
the URL itself. Every service reads the one config file, but only the consensus and the
router use these: a variable that is not set is an error when such a service starts
(`missing_url`), not when any process loads the file.

The config loader hands over its reader (services/common/yaml_reader.py), so problems keep the
`file:line: key: message` format.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import yaml

from services.common.yaml_reader import YamlReader

STATE_KEYS = ("database_url", "database_url_env", "database_schema", "statement_timeout_ms", "pool_size", "redis_url",
              "redis_url_env", "redis_prefix", "redis_timeout_ms", "rate_limit_without_redis")
RATE_LIMIT_FAILURE_MODES = ("open", "closed")
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_POSTGRES_EXAMPLE = "postgresql://USER@HOST:5432/DATABASE (the password in $PGPASSWORD)"
_REDIS_EXAMPLE = "redis://HOST:6379/0"


@dataclass(frozen=True)
class StateSettings:
    database_url: str = field(default="", repr=False)  # empty = SQLite files (the embedded default)
    database_schema: str = "mirador"
    statement_timeout_ms: int = 5000
    pool_size: int = 8
    redis_url: str = field(default="", repr=False)  # empty = in-process sessions and buckets
    redis_prefix: str = "mirador:"
    redis_timeout_ms: int = 250
    rate_limit_without_redis: str = "open"
    database_url_env: str = ""  # the environment variable that held database_url, if it came from one
    redis_url_env: str = ""
    # The config file and where each key was given ({key: line}), so that a failure at start
    # names file, line and key.
    source: str = field(default="", compare=False, repr=False)
    lines: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    @property
    def uses_postgresql(self) -> bool:
        return bool(self.database_url or self.database_url_env)

    @property
    def uses_redis(self) -> bool:
        return bool(self.redis_url or self.redis_url_env)

    def key_of(self, url: str) -> str:
        """The config key that gave `url` ("database_url" or "redis_url"): itself or its `_env`."""
        return f"state.{url}_env" if getattr(self, f"{url}_env") else f"state.{url}"

    def missing_url(self, url: str) -> str | None:
        """Why `url` is not there when it is asked for through an environment variable that is
        not set in this process (the problem of key `key_of(url)`, line `lines[url]`); else None."""
        if getattr(self, url) or not getattr(self, f"{url}_env"):
            return None
        return (f"the environment variable {getattr(self, f'{url}_env')} is not set or empty in this process; "
                "set it (e.g. from the Secret) before starting the service")


def redact_url(url: str) -> str:
    """The URL with its password replaced by `***` (for messages and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def read_state(reader: YamlReader, node: yaml.Node) -> StateSettings:
    entries = reader.mapping(node, "state", STATE_KEYS)
    values: dict[str, Any] = {}
    lines: dict[str, int] = {}
    for name, (key_node, value_node) in entries.items():
        key = f"state.{name}"
        lines[name] = key_node.start_mark.line + 1
        if name == "database_url":
            values[name] = _url(reader, value_node, key, ("postgresql", "postgres"), _POSTGRES_EXAMPLE)
        elif name == "redis_url":
            values[name] = _url(reader, value_node, key, ("redis", "rediss", "unix"), _REDIS_EXAMPLE)
        elif name in ("database_url_env", "redis_url_env"):
            url = name.removesuffix("_env")
            schemes, example = (("postgresql", "postgres"), _POSTGRES_EXAMPLE) if url == "database_url" else (
                ("redis", "rediss", "unix"), _REDIS_EXAMPLE)
            variable, values[url] = _url_from_env(reader, value_node, key, schemes, example)
            values[name] = variable
            lines[url] = lines[name]
        elif name == "database_schema":
            schema = reader.string(value_node, key)
            if schema is not None and not _SCHEMA_NAME.match(schema):
                reader.problem(value_node, key, f"`{schema}` is not a plain schema name; use lower-case letters, "
                                                "digits and `_` (at most 63), starting with a letter or `_`")
                schema = None
            values[name] = schema
        elif name == "statement_timeout_ms":
            values[name] = reader.integer(value_node, key, minimum=10, maximum=600_000)
        elif name == "pool_size":
            values[name] = reader.integer(value_node, key, minimum=1, maximum=256)
        elif name == "redis_timeout_ms":
            values[name] = reader.integer(value_node, key, minimum=1, maximum=60_000)
        elif name == "redis_prefix":
            values[name] = reader.string(value_node, key)
        else:  # rate_limit_without_redis
            values[name] = reader.string(value_node, key, choices=RATE_LIMIT_FAILURE_MODES)
    for url in ("database_url", "redis_url"):
        if url in entries and f"{url}_env" in entries:
            reader.problem(entries[f"{url}_env"][0], f"state.{url}_env",
                           f"give `{url}` or `{url}_env` (the environment variable that holds it), not both")
    if values.get("rate_limit_without_redis") and not (values.get("redis_url") or values.get("redis_url_env")):
        reader.problem(entries["rate_limit_without_redis"][0], "state.rate_limit_without_redis",
                       "has no effect without `redis_url`: rate limits are kept in process; remove it or set redis_url")
    return StateSettings(**{k: v for k, v in values.items() if v is not None}, source=reader.path, lines=lines)


def _url_from_env(reader: YamlReader, node: yaml.Node, key: str, schemes: tuple[str, ...],
                  example: str) -> tuple[str | None, str | None]:
    """(the variable's name, its URL). A variable that is not set here gives no URL and no
    problem: the services that use it say so when they start (StateSettings.missing_url)."""
    variable = reader.string(node, key)
    if variable is None:
        return None, None
    if not _ENV_NAME.match(variable):
        reader.problem(node, key, f"`{variable}` is not an environment variable name; give the variable's name "
                                  "(like MIRADOR_DATABASE_URL), not the URL")
        return None, None
    value = os.environ.get(variable, "").strip()
    if not value:
        return variable, None
    return variable, _url(reader, node, key, schemes, example, value=value, source=f" (from ${variable})")


def _url(reader: YamlReader, node: yaml.Node, key: str, schemes: tuple[str, ...], example: str, *, value: str | None = None,
         source: str = "") -> str | None:
    """A URL with one of `schemes` and a host; `value` when it came from elsewhere than the node."""
    value = reader.string(node, key) if value is None else value
    if value is None:
        return None
    try:
        parts = urlsplit(value.strip())
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError as exc:
        reader.problem(node, key, f"not a URL{source} ({exc}); write it as {example}")
        return None
    if parts.scheme not in schemes:
        reader.problem(node, key, f"the scheme `{parts.scheme or '(none)'}`{source} is not one of "
                                  f"{', '.join(schemes)}; write it as {example}")
        return None
    if parts.scheme != "unix" and not parts.hostname and "host=" not in parts.query:
        reader.problem(node, key, f"names no host{source}; write it as {example}")
        return None
    return value.strip()

"""Reading a YAML config with positions: values converted and checked one node at a time, every
problem collected with its file, line and dotted key (`file:line: key: message`), all reported at
once. What the values mean is the config's business (services/common/config.py)."""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

_IP_PORT = re.compile(r"^(?:\d{1,3}(?:\.\d{1,3}){3}|\[[0-9a-fA-F:.]+\]):\d{1,5}$")
_TARGET = re.compile(r"^(?:(?:dns|ipv4|ipv6|unix):\S+|[^\s:/]+:\d{1,5}|\[[0-9a-fA-F:.]+\]:\d{1,5})$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True)
class ConfigProblem:
    path: str
    line: int  # 1-based
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.key}: {self.message}"


class ConfigError(ValueError):
    """One or more problems in a config file, each with file, line and key."""

    def __init__(self, problems: list[ConfigProblem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class YamlReader:
    """Walks a YAML node tree, converting values and collecting problems with their line numbers."""

    def __init__(self, path: str):
        self.path = path
        self.problems: list[ConfigProblem] = []
        self._constructor = yaml.constructor.SafeConstructor()

    def problem(self, node: yaml.Node, key: str, message: str) -> None:
        self.problems.append(ConfigProblem(self.path, node.start_mark.line + 1, key, message))

    # -- structure

    def mapping(self, node: yaml.Node, key: str, allowed: tuple[str, ...] | None) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        """Returns {name: (key node, value node)}; reports non-mappings, duplicates and unknown keys."""
        if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
            return {}
        if not isinstance(node, yaml.MappingNode):
            self.problem(node, key, "must be a mapping of `key: value` lines")
            return {}
        entries: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            name = str(key_node.value)
            dotted = f"{key}.{name}" if key else name
            if name in entries:
                first = entries[name][0].start_mark.line + 1
                self.problem(key_node, dotted, f"appears twice (first on line {first}); keep one")
                continue
            if allowed is not None and name not in allowed:
                hint = difflib.get_close_matches(name, allowed, n=1)
                did_you_mean = f" Did you mean `{hint[0]}`?" if hint else ""
                self.problem(key_node, dotted, f"unknown key.{did_you_mean} Allowed here: {', '.join(allowed)}")
                continue
            entries[name] = (key_node, value_node)
        return entries

    # -- scalars

    def value(self, node: yaml.Node) -> Any:
        return self._constructor.construct_object(node, deep=True)

    def string(self, node: yaml.Node, key: str, *, choices: tuple[str, ...] | None = None) -> str | None:
        value = self.value(node)
        if not isinstance(value, str) or not value.strip():
            self.problem(node, key, "must be a non-empty string")
            return None
        if choices and value not in choices:
            self.problem(node, key, f"`{value}` is not allowed; use one of: {', '.join(choices)}")
            return None
        return value

    def integer(self, node: yaml.Node, key: str, *, minimum: int, maximum: int | None = None) -> int | None:
        value = self.value(node)
        if isinstance(value, bool) or not isinstance(value, int):
            self.problem(node, key, f"must be a whole number, got `{node.value}`")
            return None
        if value < minimum or (maximum is not None and value > maximum):
            upper = f" and {maximum}" if maximum is not None else ""
            bound = f"between {minimum}{upper}" if maximum is not None else f"at least {minimum}"
            self.problem(node, key, f"must be {bound}, got {value}")
            return None
        return value

    def fraction(self, node: yaml.Node, key: str) -> float | None:
        value = self.value(node)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.problem(node, key, f"must be a number between 0 and 1, got `{node.value}`")
            return None
        if not 0.0 <= value <= 1.0:
            self.problem(node, key, f"must be between 0 and 1, got {value}")
            return None
        return float(value)

    def rate(self, node: yaml.Node, key: str) -> float | None:
        """Requests per second: a number >= 0 (0 = no limit)."""
        value = self.value(node)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
            self.problem(node, key, f"must be requests per second, a number >= 0 (0 = no limit), got `{node.value}`")
            return None
        return float(value)

    def duration_s(self, node: yaml.Node, key: str) -> float | None:
        """A duration: seconds as a number, or a string like `500ms`, `30s`, `5m`, `1h`."""
        value = self.value(node)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            seconds = float(value)
        elif isinstance(value, str) and (match := _DURATION.match(value)):
            seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        else:
            self.problem(node, key, f"`{node.value}` is not a duration; write seconds (30) or 500ms, 30s, 5m, 1h")
            return None
        if seconds < 0:
            self.problem(node, key, f"must not be negative, got {node.value}")
            return None
        return seconds

    def names(self, node: yaml.Node, key: str) -> tuple[str, ...] | None:
        """A list of strings; a single string is a list of one."""
        value = self.value(node)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
            self.problem(node, key, "must be a string or a list of non-empty strings")
            return None
        return tuple(value)

    def targets(self, node: yaml.Node, key: str) -> tuple[str, ...] | None:
        """gRPC targets: one address or name (`host:port`, `dns:///name:port`), or several
        `ip:port` addresses of one family (gRPC balances those with round_robin)."""
        targets = self.names(node, key)
        if targets is None:
            return None
        if len(targets) == 1:
            if not _TARGET.match(targets[0]):
                self.problem(node, key, f"`{targets[0]}` is not a gRPC target; write host:port or dns:///name:port")
                return None
            return targets
        families = set()
        for target in targets:
            match = _IP_PORT.match(target)
            if not match:
                self.problem(node, key, f"`{target}`: several targets must each be an IP address and a port "
                                        "(127.0.0.1:50061 or [::1]:50061); for a DNS name give it alone (dns:///name:port)")
                return None
            families.add("ipv6" if target.startswith("[") else "ipv4")
        if len(families) > 1:
            self.problem(node, key, "mixes IPv4 and IPv6 addresses; gRPC takes one family per target list")
            return None
        if len(set(targets)) != len(targets):
            self.problem(node, key, "lists an address twice; give each once")
            return None
        return targets

    def boolean(self, node: yaml.Node, key: str) -> bool | None:
        value = self.value(node)
        if not isinstance(value, bool):
            self.problem(node, key, f"must be true or false, got `{node.value}`")
            return None
        return value

    def readable_file(self, node: yaml.Node, key: str, base: Path, *, pem: str | None = None) -> Path | None:
        """A path (relative ones are read from `base`, the config's folder) to a readable file;
        with `pem`, the file must hold a PEM block of that kind (CERTIFICATE, PRIVATE KEY)."""
        value = self.string(node, key)
        if value is None:
            return None
        file = Path(os.path.expanduser(value))
        file = file if file.is_absolute() else (base / file)
        file = file.resolve()
        if not file.exists():
            self.problem(node, key, f"{file} does not exist")
            return None
        if not file.is_file():
            self.problem(node, key, f"{file} is not a file")
            return None
        try:
            data = file.read_bytes()
        except OSError as exc:
            self.problem(node, key, f"cannot read {file}: {exc.strerror}; check its permissions for this user")
            return None
        if pem and (b"-----BEGIN" not in data or pem.encode() not in data):
            self.problem(node, key, f"{file} holds no PEM `{pem}` block; give a PEM-encoded file")
            return None
        return file

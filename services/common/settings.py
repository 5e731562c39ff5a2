"""What every service's settings have (where it listens, how much it takes on, where others dial
it), and the readers each setting names beside its field. A service declares its settings class
in services/<name>/settings.py (as `SETTINGS`), built on `ServiceSettings`; the config
(services/common/config.py) reads `services.<name>:` into it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import yaml

if TYPE_CHECKING:
    from services.common.yaml_reader import YamlReader

# How each service setting is read from YAML: every field of a *Settings class names its reader in
# its metadata (`setting(default, reader)`), so a new setting is declared in one place.
Read = Callable[["YamlReader", yaml.Node, str], Any]


def setting(default: Any, read: Read) -> Any:
    return field(default=default, metadata={"read": read})


def whole(minimum: int, maximum: int | None = None) -> Read:
    return lambda reader, node, key: reader.integer(node, key, minimum=minimum, maximum=maximum)


def text(reader: "YamlReader", node: yaml.Node, key: str) -> str | None:
    return reader.string(node, key)


def choice(choices: tuple[str, ...]) -> Read:
    return lambda reader, node, key: reader.string(node, key, choices=choices)


def seconds(reader: "YamlReader", node: yaml.Node, key: str) -> float | None:
    return reader.duration_s(node, key)


def one_target(reader: "YamlReader", node: yaml.Node, key: str) -> str | None:
    found = reader.targets(node, key)
    if found is not None and len(found) > 1:
        reader.problem(node, key, "give one target (host:port or dns:///name:port)")
        return None
    return found[0] if found else None


def fraction(reader: "YamlReader", node: yaml.Node, key: str) -> float | None:
    return reader.fraction(node, key)


def rate(reader: "YamlReader", node: yaml.Node, key: str) -> float | None:
    return reader.rate(node, key)


def boolean(reader: "YamlReader", node: yaml.Node, key: str) -> bool | None:
    return reader.boolean(node, key)


def names(reader: "YamlReader", node: yaml.Node, key: str) -> tuple[str, ...] | None:
    return reader.names(node, key)


def targets(reader: "YamlReader", node: yaml.Node, key: str) -> tuple[str, ...] | None:
    return reader.targets(node, key)


@dataclass(frozen=True)
class ServiceSettings:
    """Where one service listens and how much it takes on."""

    host: str = setting("127.0.0.1", text)
    port: int = setting(0, whole(1, 65535))
    max_concurrent_rpcs: int = setting(256, whole(1))  # calls beyond it are refused with RESOURCE_EXHAUSTED
    shutdown_grace_s: float = setting(5.0, seconds)  # in-flight calls get this long to finish on SIGTERM
    metrics_port: int = setting(0, whole(0, 65535))  # Prometheus /metrics over HTTP on this port (same host); 0 = off
    # Where the other services and the CLI reach this one, when not at host:port (which is where it
    # listens: 0.0.0.0 in a pod): a gRPC target such as dns:///mirador-consensus:50052.
    target: str = setting("", one_target)

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def client_target(self) -> str:
        """What a caller dials: `target`, else host:port."""
        return self.target or self.address

"""The Mirador config file: the fleet, the routes and where each service listens.

One YAML file, read once into frozen dataclasses. Every problem is reported with
the file, the line and the dotted key, and says what is allowed; all problems are
collected before raising so a user fixes them in one pass.

The article's own route syntax loads as is: the top-level key `models:` is
accepted as the article's name for `routes:`.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parents[2] / "config" / "mirador.yaml"
CONFIG_ENV_VAR = "MIRADOR_CONFIG"

TASKS = ("text-generation", "embedding", "classification")
TIERS = ("hot", "warm", "cold")
SERVICE_NAMES = ("router", "consensus", "quantizer", "model_host")
DEFAULT_PORTS = {"router": 50051, "consensus": 50052, "quantizer": 50053, "model_host": 50061}

_IP_PORT = re.compile(r"^(?:\d{1,3}(?:\.\d{1,3}){3}|\[[0-9a-fA-F:.]+\]):\d{1,5}$")
_TARGET = re.compile(r"^(?:(?:dns|ipv4|ipv6|unix):\S+|[^\s:/]+:\d{1,5}|\[[0-9a-fA-F:.]+\]:\d{1,5})$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


# --------------------------------------------------------------------------- typed config


@dataclass(frozen=True)
class ServiceSettings:
    """Where one service listens and how much it takes on."""

    host: str = "127.0.0.1"
    port: int = 0
    max_concurrent_rpcs: int = 256  # calls beyond it are refused with RESOURCE_EXHAUSTED
    shutdown_grace_s: float = 5.0  # in-flight calls get this long to finish on SIGTERM

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class RouterSettings(ServiceSettings):
    default_route: str | None = None  # where low-confidence requests go
    min_confidence: float = 0.5  # below it the default route answers
    # Model-host addresses the router balances over (gRPC round_robin with health checks).
    # Empty = every replica of services.model_host (see ServicesConfig.model_host_targets).
    model_host_targets: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelHostSettings(ServiceSettings):
    memory_budget_mb: int = 0  # 0 = no budget
    execution_providers: tuple[str, ...] = ("CPUExecutionProvider",)
    intra_op_threads: int = 0  # ONNX Runtime threads per session; 0 = one per core
    max_batch_size: int = 16  # dynamic batching of Embed calls; 1 = off
    max_queue_delay_ms: int = 2  # how long a batch waits for more calls
    reaper_interval_s: float = 1.0  # how often idle warm/cold models are checked against keep_alive
    replicas: int = 1  # processes `mirador up` starts; replica i listens on port + i

    def replica(self, index: int) -> "ModelHostSettings":
        """The settings of replica `index` (0 = this one): the same, listening on port + index."""
        return replace(self, port=self.port + index, replicas=1)

    @property
    def replica_addresses(self) -> tuple[str, ...]:
        return tuple(self.replica(i).address for i in range(self.replicas))


@dataclass(frozen=True)
class ConsensusSettings(ServiceSettings):
    escalation_db: str = ""  # SQLite file; empty = <state dir>/escalations.sqlite3


@dataclass(frozen=True)
class QuantizerSettings(ServiceSettings):
    block_size: int = 32


@dataclass(frozen=True)
class ServicesConfig:
    router: RouterSettings
    consensus: ConsensusSettings
    quantizer: QuantizerSettings
    model_host: ModelHostSettings

    def items(self) -> list[tuple[str, ServiceSettings]]:
        return [(name, getattr(self, name)) for name in SERVICE_NAMES]

    @property
    def model_host_targets(self) -> tuple[str, ...]:
        """Where the router sends model-host calls: services.router.model_host_targets, or
        every replica of services.model_host when that is not given."""
        return self.router.model_host_targets or self.model_host.replica_addresses


@dataclass(frozen=True)
class ModelSpec:
    """A model of the fleet: what it does and how long it stays in memory."""

    name: str
    task: str
    recipe: str | None = None  # fleet-builder recipe that builds it; None = found in the repository
    version: str | None = None  # repository version; None = latest
    capabilities: tuple[str, ...] = ()
    tier: str = "warm"
    keep_alive_s: float = 300.0
    quantization: str | None = None
    description: str = ""


@dataclass(frozen=True)
class RouteSpec:
    """A kind of request and the models that answer it (the article's `models:` entries)."""

    name: str
    primary: str
    fallback: tuple[str, ...] = ()
    validators: tuple[str, ...] = ()
    consensus_threshold: float | None = None
    timeout_ms: int = 30_000
    options: tuple[str, ...] = ()  # answer options of a label decision (consensus routes)
    examples: tuple[str, ...] = ()  # requests that teach the router what belongs here
    description: str = ""

    @property
    def uses_consensus(self) -> bool:
        return bool(self.validators)


@dataclass(frozen=True)
class MiradorConfig:
    path: Path
    services: ServicesConfig
    fleet: dict[str, ModelSpec]
    routes: dict[str, RouteSpec]
    model_repository: Path | None = None  # None = the user cache dir (see model_repository)


# --------------------------------------------------------------------------- errors


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


# --------------------------------------------------------------------------- reading


def load_config(path: str | os.PathLike | None = None) -> MiradorConfig:
    """Reads and validates a config file; raises ConfigError listing every problem."""
    path = Path(path or os.environ.get(CONFIG_ENV_VAR) or DEFAULT_CONFIG_PATH)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([ConfigProblem(str(path), 0, "<file>", f"cannot read the file: {exc.strerror}")]) from exc
    return parse_config(text, path)


def parse_config(text: str, path: str | os.PathLike = "<string>") -> MiradorConfig:
    reader = _Reader(str(path))
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else 0
        raise ConfigError([ConfigProblem(str(path), line, "<yaml>", f"not valid YAML: {exc}")]) from exc
    if root is None:
        raise ConfigError([ConfigProblem(str(path), 1, "<file>", "the file is empty; see config/mirador.yaml")])
    config = reader.read_root(root, Path(path))
    if reader.problems:
        raise ConfigError(reader.problems)
    return config


class _Reader:
    """Walks the YAML node tree, converting values and collecting problems with line numbers."""

    def __init__(self, path: str):
        self.path = path
        self.problems: list[ConfigProblem] = []
        self._constructor = yaml.constructor.SafeConstructor()
        self._default_route_node: yaml.Node | None = None
        self._replicas_node: yaml.Node | None = None

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

    # -- sections

    def read_root(self, root: yaml.Node, path: Path) -> MiradorConfig:
        top = self.mapping(root, "", ("services", "model_repository", "fleet", "routes", "models"))
        if "routes" in top and "models" in top:
            self.problem(top["models"][0], "models", "give routes under `routes:` or `models:` (the article's name), not both")
        services = self.read_services(top.get("services", (root, None))[1], root)
        fleet = self.read_fleet(top["fleet"][1]) if "fleet" in top else {}
        if "fleet" not in top:
            self.problem(root, "fleet", "missing: list the models under `fleet:` (name → task, tier, ...)")
        route_key = "models" if "models" in top and "routes" not in top else "routes"
        routes = self.read_routes(top[route_key][1], route_key, fleet) if route_key in top else {}
        if services.router.default_route and services.router.default_route not in routes:
            node = self._default_route_node or root
            self.problem(node, "services.router.default_route",
                         f"route `{services.router.default_route}` is not defined; defined routes: {', '.join(routes) or 'none'}")
        repository = None
        if "model_repository" in top:
            value = self.string(top["model_repository"][1], "model_repository")
            repository = Path(os.path.expanduser(value)) if value else None
        return MiradorConfig(path=path, services=services, fleet=fleet, routes=routes, model_repository=repository)

    _SERVICE_TYPES = {
        "router": RouterSettings,
        "consensus": ConsensusSettings,
        "quantizer": QuantizerSettings,
        "model_host": ModelHostSettings,
    }
    def read_services(self, node: yaml.Node | None, root: yaml.Node) -> ServicesConfig:
        entries = self.mapping(node, "services", SERVICE_NAMES) if node is not None else {}
        built: dict[str, ServiceSettings] = {}
        seen_addresses: dict[tuple[str, int], str] = {}
        for name in SERVICE_NAMES:
            settings_type = self._SERVICE_TYPES[name]
            key_node, value_node = entries.get(name, (None, None))
            values = self.read_service(value_node, f"services.{name}", settings_type) if value_node else {}
            values.setdefault("port", DEFAULT_PORTS[name])
            settings = settings_type(**values)
            address = (settings.host, settings.port)
            if address in seen_addresses:
                self.problem(value_node or root, f"services.{name}.port",
                             f"port {settings.port} is already used by services.{seen_addresses[address]}; give each service its own port")
            seen_addresses[address] = name
            built[name] = settings
        host = built["model_host"]
        if host.replicas > 1:
            key_node, value_node = entries.get("model_host", (None, None))
            node = self._replicas_node or value_node or root
            last = host.port + host.replicas - 1
            if last > 65535:
                self.problem(node, "services.model_host.replicas",
                             f"{host.replicas} replicas need ports {host.port}-{last}, beyond 65535; "
                             "lower the port or the number of replicas")
            for index in range(1, host.replicas):
                other = seen_addresses.get((host.host, host.port + index))
                if other is not None and other != "model_host":
                    self.problem(node, "services.model_host.replicas",
                                 f"replica {index} would listen on port {host.port + index}, which services.{other} "
                                 f"uses; model-host replicas take ports {host.port}-{last}, give services.{other} "
                                 "another port or lower the number of replicas")
        return ServicesConfig(**built)

    def read_service(self, node: yaml.Node, key: str, settings_type: type[ServiceSettings]) -> dict[str, Any]:
        allowed = tuple(f.name for f in fields(settings_type))
        values: dict[str, Any] = {}
        for name, (_, value_node) in self.mapping(node, key, allowed).items():
            dotted = f"{key}.{name}"
            if name == "host":
                value = self.string(value_node, dotted)
            elif name == "port":
                value = self.integer(value_node, dotted, minimum=1, maximum=65535)
            elif name in ("max_concurrent_rpcs", "block_size", "max_batch_size"):
                value = self.integer(value_node, dotted, minimum=1)
            elif name in ("intra_op_threads", "max_queue_delay_ms"):
                value = self.integer(value_node, dotted, minimum=0)
            elif name == "reaper_interval_s":
                value = self.duration_s(value_node, dotted)
            elif name == "memory_budget_mb":
                value = self.integer(value_node, dotted, minimum=0)
            elif name == "shutdown_grace_s":
                value = self.duration_s(value_node, dotted)
            elif name == "min_confidence":
                value = self.fraction(value_node, dotted)
            elif name == "default_route":
                value = self.string(value_node, dotted)
                self._default_route_node = value_node
            elif name == "execution_providers":
                value = self.names(value_node, dotted)
            elif name == "replicas":
                value = self.integer(value_node, dotted, minimum=1, maximum=64)
                self._replicas_node = value_node
            elif name == "model_host_targets":
                value = self.targets(value_node, dotted)
            else:  # escalation_db
                value = self.string(value_node, dotted)
            if value is not None:
                values[name] = value
        return values

    _MODEL_KEYS = ("task", "recipe", "version", "capabilities", "tier", "keep_alive", "quantization", "description")

    def read_fleet(self, node: yaml.Node) -> dict[str, ModelSpec]:
        fleet: dict[str, ModelSpec] = {}
        for name, (_, value_node) in self.mapping(node, "fleet", None).items():
            key = f"fleet.{name}"
            entries = self.mapping(value_node, key, self._MODEL_KEYS)
            values: dict[str, Any] = {}
            if "task" not in entries:
                self.problem(value_node, f"{key}.task", f"missing; say what the model does: {', '.join(TASKS)}")
            for field_name, (_, field_node) in entries.items():
                dotted = f"{key}.{field_name}"
                if field_name == "task":
                    values["task"] = self.string(field_node, dotted, choices=TASKS)
                elif field_name == "tier":
                    values["tier"] = self.string(field_node, dotted, choices=TIERS)
                elif field_name == "keep_alive":
                    values["keep_alive_s"] = self.duration_s(field_node, dotted)
                elif field_name == "capabilities":
                    values["capabilities"] = self.names(field_node, dotted)
                elif field_name == "version":
                    values["version"] = str(self.value(field_node))
                else:
                    values[field_name] = self.string(field_node, dotted)
            values = {k: v for k, v in values.items() if v is not None}
            fleet[name] = ModelSpec(name=name, task=values.pop("task", "text-generation"), **values)
        return fleet

    _ROUTE_KEYS = ("primary", "fallback", "validators", "consensus_threshold", "timeout_ms", "options", "examples", "description")

    def read_routes(self, node: yaml.Node, section: str, fleet: dict[str, ModelSpec]) -> dict[str, RouteSpec]:
        routes: dict[str, RouteSpec] = {}
        for name, (_, value_node) in self.mapping(node, section, None).items():
            key = f"{section}.{name}"
            entries = self.mapping(value_node, key, self._ROUTE_KEYS)
            values: dict[str, Any] = {}
            for field_name, (_, field_node) in entries.items():
                dotted = f"{key}.{field_name}"
                if field_name in ("primary", "description"):
                    values[field_name] = self.string(field_node, dotted)
                elif field_name in ("fallback", "validators", "options", "examples"):
                    values[field_name] = self.names(field_node, dotted)
                elif field_name == "consensus_threshold":
                    values[field_name] = self.fraction(field_node, dotted)
                else:  # timeout_ms
                    values[field_name] = self.integer(field_node, dotted, minimum=1)
                if field_name in ("primary", "fallback", "validators"):
                    self.check_models_exist(field_node, dotted, values[field_name], fleet)
            values = {k: v for k, v in values.items() if v is not None}
            if "primary" not in entries:
                self.problem(value_node, f"{key}.primary", "missing; name the model from `fleet:` that answers this route")
                continue
            if "primary" not in values:
                continue
            if values.get("consensus_threshold") is not None and not values.get("validators"):
                self.problem(entries["consensus_threshold"][1], f"{key}.consensus_threshold",
                             "has no effect without `validators:`; list the models that vote with the primary")
            if values["primary"] in values.get("validators", ()):
                self.problem(entries["validators"][1], f"{key}.validators",
                             f"`{values['primary']}` is the primary already; validators must be other models")
            routes[name] = RouteSpec(name=name, **values)
        return routes

    def check_models_exist(self, node: yaml.Node, key: str, value: str | tuple[str, ...] | None, fleet: dict[str, ModelSpec]) -> None:
        names = (value,) if isinstance(value, str) else (value or ())
        for model in names:
            if model not in fleet:
                defined = ", ".join(sorted(fleet)) or "none"
                self.problem(node, key, f"model `{model}` is not in `fleet:`; defined models: {defined}")

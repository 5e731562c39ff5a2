"""The Mirador config file: the fleet, the routes and where each service listens.

One YAML file, read once into frozen dataclasses. Every problem is reported with
the file, the line and the dotted key, and says what is allowed; all problems are
collected before raising so a user fixes them in one pass.

The article's own route syntax loads as is: the top-level key `models:` is
accepted as the article's name for `routes:`.

Why one module (~630 lines): each service declares its own settings beside its code
(services/<name>/settings.py, on services/common/settings.py's base, every field naming its
reader); this module reads
`services.<name>:` into the class that service declares, the fleet, the routes and the security
section, and checks them against each other (a route naming a model, ports that clash, an
embedding model that must exist) in one pass. YAML handling lives in yaml_reader.py, the
`state:` section in state_settings.py.
"""

from __future__ import annotations

import difflib
import importlib
import os
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from services.common.settings import ServiceSettings
from services.common.yaml_reader import ConfigError, ConfigProblem, YamlReader
from services.common.state_settings import StateSettings, read_state
from services.defaults import DEFAULT_CONFIG_PATH

if TYPE_CHECKING:  # each service's own settings (services/<name>/settings.py), for readers and type checkers
    from services.consensus.settings import ConsensusSettings
    from services.gateway.settings import GatewaySettings
    from services.model_host.settings import ModelHostSettings
    from services.quantizer.settings import QuantizerSettings
    from services.router.settings import RouterSettings

CONFIG_ENV_VAR = "MIRADOR_CONFIG"

TASKS = ("text-generation", "embedding", "classification")
TIERS = ("hot", "warm", "cold")
PRIORITIES = ("normal", "critical")
SERVICE_NAMES = ("router", "consensus", "quantizer", "model_host")
DEFAULT_PORTS = {"router": 50051, "consensus": 50052, "quantizer": 50053, "model_host": 50061, "gateway": 8080}
# Services that speak HTTP, not gRPC (no grpc.health.v1; `mirador up` checks their /healthz).
HTTP_SERVICE_NAMES = ("gateway",)


# --------------------------------------------------------------------------- typed config


def service_settings_type(name: str) -> type[ServiceSettings]:
    """The settings class a service declares beside its code (services/<name>/settings.py, `SETTINGS`):
    looked up by name, so common imports no service."""
    return importlib.import_module(f"services.{name}.settings").SETTINGS


@dataclass(frozen=True)
class ServicesConfig:
    router: RouterSettings
    consensus: ConsensusSettings
    quantizer: QuantizerSettings
    model_host: ModelHostSettings
    # not in items(): it speaks HTTP
    gateway: GatewaySettings = field(default_factory=lambda: service_settings_type("gateway")())

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
    description: str = ""
    rollout: "RolloutSpec | None" = None  # a candidate version tried on live traffic
    repository_name: str | None = None  # its name in the model repository, when not `name` (rollout candidates)
    # Decoders: sequences generated together (continuous batching), each with a KV slot of
    # `max_context` tokens (prompt + answer); the slots' KV memory counts in the model's size.
    max_num_seqs: int = 8
    max_context: int = 1024
    # Model hosts that keep it loaded when the router places models across hosts (hot models may ask for more)
    copies: int = 1
    # Classifiers: the fleet embedding model whose session this one runs on, as a small head over its
    # pooled embedding (the encoder loads once for all its heads, and is counted once in the budget)
    encoder: str | None = None

    @property
    def artifact(self) -> str:
        """The model's name in the model repository."""
        return self.repository_name or self.name


ROLLOUT_MODES = ("canary", "shadow")


def candidate_name(model: str, version: str) -> str:
    """The fleet name under which a rollout's candidate version is served: `MODEL@VERSION`."""
    return f"{model}@{version}"


@dataclass(frozen=True)
class RolloutSpec:
    """`fleet.NAME.rollout`: a candidate version of the model tried on live traffic. The
    router judges it on its last `window` calls (once it has `min_calls`) and rolls back
    to the stable version by itself when a limit is crossed; promotion is explicit
    (`mirador rollout promote NAME`)."""

    version: str  # the candidate's version in the model repository
    mode: str = "canary"  # canary: answers `share` of requests; shadow: gets a copy of `share`, never answers
    share: float = 0.1
    window: int = 50
    min_calls: int = 10
    max_error_rate: float = 0.1  # failed calls / calls (busy and cancelled calls do not count)
    max_latency_ratio: float = 2.0  # candidate's median time to first token / the stable version's
    # Share of compared answers whose words differ from the stable version's (similarity
    # below 0.5); answers are compared on every shadow call, and on canary calls the
    # stable version also answers in the background. None = not judged, nothing mirrored.
    max_disagreement: float | None = None


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
    priority: str = "normal"  # "critical": admitted first when a model's queue is nearly full

    @property
    def uses_consensus(self) -> bool:
        return bool(self.validators)


@dataclass(frozen=True)
class TlsSettings:
    """`security.tls`: every service serves TLS with `cert`/`key`; every client (services, CLI,
    health checks) checks servers against `ca` and presents `client_cert`/`client_key`
    (default: `cert`/`key`). Paths are absolute (relative ones are read from the config's folder)."""

    cert: Path
    key: Path
    ca: Path | None = None  # checks peers' certificates; None = the system's roots, no client checks
    require_client_cert: bool = False  # servers refuse clients without a certificate signed by `ca`
    client_cert: Path | None = None
    client_key: Path | None = None
    server_name: str | None = None  # the name expected in server certificates when not the address


@dataclass(frozen=True)
class SecurityConfig:
    """`security:`; empty = plaintext and no token, as without the section."""

    tls: TlsSettings | None = None
    # The router's bearer token, read from `auth.bearer_token_env` or `auth.bearer_token_file`
    # when the config loads (never written in the YAML itself).
    bearer_token: str | None = field(default=None, repr=False)
    bearer_token_source: str = ""  # "environment variable X" or "file Y", for messages


@dataclass(frozen=True)
class MiradorConfig:
    path: Path
    services: ServicesConfig
    fleet: dict[str, ModelSpec]
    routes: dict[str, RouteSpec]
    model_repository: Path | None = None  # None = the user cache dir (see model_repository)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    state: StateSettings = field(default_factory=StateSettings)  # state_settings.py


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
    try:
        config = reader.read_root(root, Path(path))
    except yaml.YAMLError as exc:  # a value no safe constructor builds, e.g. `!!python/object:...` or `!custom x`
        mark = getattr(exc, "problem_mark", None)
        raise ConfigError([*reader.problems, ConfigProblem(
            str(path), mark.line + 1 if mark else 0, "<yaml>",
            f"{getattr(exc, 'problem', None) or exc}; write plain YAML values (no tags)")]) from exc
    if reader.problems:
        raise ConfigError(reader.problems)
    return config


class _Reader(YamlReader):
    """Reads Mirador's sections (services, fleet, routes, security, state) into the typed config."""

    def __init__(self, path: str):
        super().__init__(path)
        self.service_nodes: dict[str, yaml.Node] = {}  # "services.router.default_route" -> its value's node
        self.encoder_nodes: dict[str, yaml.Node] = {}  # head model -> its `encoder:` value's node

    # -- sections

    def read_root(self, root: yaml.Node, path: Path) -> MiradorConfig:
        top = self.mapping(root, "", ("services", "model_repository", "fleet", "routes", "models", "security", "state"))
        if "routes" in top and "models" in top:
            self.problem(top["models"][0], "models", "give routes under `routes:` or `models:` (the article's name), not both")
        services = self.read_services(top.get("services", (root, None))[1], root)
        fleet = self.read_fleet(top["fleet"][1]) if "fleet" in top else {}
        if "fleet" not in top:
            self.problem(root, "fleet", "missing: list the models under `fleet:` (name → task, tier, ...)")
        route_key = "models" if "models" in top and "routes" not in top else "routes"
        routes = self.read_routes(top[route_key][1], route_key, fleet) if route_key in top else {}
        consensus_embedder = fleet.get(services.consensus.embedding_model)
        consensus_embedder_node = self.service_nodes.get("services.consensus.embedding_model")
        if consensus_embedder_node is not None and getattr(consensus_embedder, "task", None) != "embedding":
            embedders = ", ".join(n for n, m in fleet.items() if m.task == "embedding") or "none"
            self.problem(consensus_embedder_node, "services.consensus.embedding_model",
                         f"`{services.consensus.embedding_model}` is not an embedding model of `fleet:`; "
                         f"embedding models: {embedders}")
        if services.router.default_route and services.router.default_route not in routes:
            node = self.service_nodes.get("services.router.default_route") or root
            self.problem(node, "services.router.default_route",
                         f"route `{services.router.default_route}` is not defined; defined routes: {', '.join(routes) or 'none'}")
        embedder = services.router.embedding_model
        if any(route.examples for route in routes.values()) and fleet and embedder not in fleet:
            self.problem(self.service_nodes.get("services.router.embedding_model") or root, "services.router.embedding_model",
                         f"model `{embedder}` is not in `fleet:`, but routes have examples to embed; "
                         f"add it to the fleet or name an embedding model: {', '.join(sorted(fleet))}")
        for model in services.router.feature_models:
            if fleet and (model not in fleet or fleet[model].task != "embedding"):
                embedders = ", ".join(n for n, m in fleet.items() if m.task == "embedding") or "none"
                self.problem(self.service_nodes.get("services.router.feature_models") or root, "services.router.feature_models",
                             f"`{model}` is not an embedding model of `fleet:`; the router's feature models must "
                             f"embed text; embedding models: {embedders}")
        repository = None
        if "model_repository" in top:
            value = self.string(top["model_repository"][1], "model_repository")
            # like every path in the file, a relative one is read from the file's folder
            repository = (path.parent / os.path.expanduser(value)) if value else None
        security = self.read_security(top["security"][1], path, services) if "security" in top else SecurityConfig()
        state = read_state(self, top["state"][1]) if "state" in top else StateSettings()
        return MiradorConfig(path=path, services=services, fleet=fleet, routes=routes, model_repository=repository,
                             security=security, state=state)

    def read_services(self, node: yaml.Node | None, root: yaml.Node) -> ServicesConfig:
        names = (*SERVICE_NAMES, *HTTP_SERVICE_NAMES)
        entries = self.mapping(node, "services", names) if node is not None else {}
        built: dict[str, ServiceSettings] = {}
        seen_addresses: dict[tuple[str, int], str] = {}
        for name in names:
            settings_type = service_settings_type(name)
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
            node = self.service_nodes.get("services.model_host.replicas") or value_node or root
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
        self.check_metrics_ports(built, entries, root)
        return ServicesConfig(**built)

    def check_metrics_ports(self, built: dict[str, ServiceSettings], entries, root: yaml.Node) -> None:
        """A metrics port must not be a gRPC port or another service's metrics port
        (model-host replica i serves /metrics on metrics_port + i)."""
        def ports(name: str, settings: ServiceSettings, metrics: bool) -> list[int]:
            first = settings.metrics_port if metrics else settings.port
            count = getattr(settings, "replicas", 1)  # model-host replica i serves on port + i
            return [first + i for i in range(count)] if first else []

        taken: dict[tuple[str, int], str] = {}
        for name, settings in built.items():
            for port in ports(name, settings, metrics=False):
                taken.setdefault((settings.host, port), f"services.{name}.port")
        for name, settings in built.items():
            node = self.service_nodes.get(f"services.{name}.metrics_port") or entries.get(name, (None, root))[1] or root
            for port in ports(name, settings, metrics=True):
                if port > 65535:
                    self.problem(node, f"services.{name}.metrics_port",
                                 f"{settings.replicas} replicas need metrics ports up to {port}, beyond 65535")
                    break
                other = taken.get((settings.host, port))
                if other is not None:
                    self.problem(node, f"services.{name}.metrics_port",
                                 f"port {port} is already used by {other}; give /metrics a port of its own")
                    break
                taken[(settings.host, port)] = f"services.{name}.metrics_port"

    def read_service(self, node: yaml.Node, key: str, settings_type: type[ServiceSettings]) -> dict[str, Any]:
        settings = {f.name: f for f in fields(settings_type)}
        values: dict[str, Any] = {}
        for name, (_, value_node) in self.mapping(node, key, tuple(settings)).items():
            dotted = f"{key}.{name}"
            self.service_nodes[dotted] = value_node  # for the checks across sections
            value = settings[name].metadata["read"](self, value_node, dotted)
            if value is not None:
                values[name] = value
        return values

    _MODEL_KEYS = ("task", "recipe", "version", "capabilities", "tier", "keep_alive", "description",
                   "rollout", "max_num_seqs", "max_context", "copies", "encoder")
    _ROLLOUT_KEYS = ("version", "mode", "share", "window", "min_calls", "max_error_rate", "max_latency_ratio",
                     "max_disagreement")

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
                elif field_name == "rollout":
                    values["rollout"] = self.read_rollout(field_node, dotted, values.get("version"))
                elif field_name == "max_num_seqs":
                    values[field_name] = self.integer(field_node, dotted, minimum=1, maximum=256)
                elif field_name == "max_context":
                    values[field_name] = self.integer(field_node, dotted, minimum=16, maximum=1 << 20)
                elif field_name == "copies":
                    values[field_name] = self.integer(field_node, dotted, minimum=1, maximum=64)
                else:
                    values[field_name] = self.string(field_node, dotted)
            values = {k: v for k, v in values.items() if v is not None}
            if values.get("rollout") is not None and values.get("version") is None:
                self.problem(entries["rollout"][1], f"{key}.version",
                             "missing: a model with a rollout needs its stable `version:` pinned (\"latest\" would be "
                             "the candidate once it is in the repository)")
                values.pop("rollout")
            fleet[name] = spec = ModelSpec(name=name, task=values.pop("task", "text-generation"), **values)
            if spec.rollout is not None:
                # the candidate is served like any model, under its own name
                candidate = candidate_name(name, spec.rollout.version)
                fleet[candidate] = replace(spec, name=candidate, version=spec.rollout.version, rollout=None,
                                           recipe=None, repository_name=name)
            if "encoder" in entries:
                self.check_encoder(entries["encoder"][1], f"{key}.encoder", spec)
        for spec in fleet.values():  # the encoder may be defined after its heads
            if spec.encoder is not None and spec.encoder not in fleet:
                embedding = ", ".join(sorted(n for n, s in fleet.items() if s.task == "embedding")) or "none"
                self.problem(self.encoder_nodes[spec.name], f"fleet.{spec.name}.encoder",
                             f"model `{spec.encoder}` is not in `fleet:`; embedding models defined: {embedding}")
            elif spec.encoder is not None and fleet[spec.encoder].task != "embedding":
                self.problem(self.encoder_nodes[spec.name], f"fleet.{spec.name}.encoder",
                             f"`{spec.encoder}` has task {fleet[spec.encoder].task}; a head runs on an embedding model")
        return fleet

    def check_encoder(self, node: yaml.Node, key: str, spec: ModelSpec) -> None:
        self.encoder_nodes[spec.name] = node
        if spec.task != "classification":
            self.problem(node, key, f"only classification models run as a head on an encoder; `{spec.name}` has "
                                    f"task {spec.task}: remove `encoder:`")

    def read_rollout(self, node: yaml.Node, key: str, stable_version: str | None) -> RolloutSpec | None:
        entries = self.mapping(node, key, self._ROLLOUT_KEYS)
        values: dict[str, Any] = {}
        for name, (_, value_node) in entries.items():
            dotted = f"{key}.{name}"
            if name == "version":
                values[name] = str(self.value(value_node))
            elif name == "mode":
                values[name] = self.string(value_node, dotted, choices=ROLLOUT_MODES)
            elif name in ("share", "max_error_rate", "max_disagreement"):
                values[name] = self.fraction(value_node, dotted)
            elif name in ("window", "min_calls"):
                values[name] = self.integer(value_node, dotted, minimum=1, maximum=100_000)
            else:  # max_latency_ratio
                value = self.value(value_node)
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 1:
                    self.problem(value_node, dotted, f"must be a number >= 1 (candidate's median time to first token "
                                                     f"over the stable version's), got `{value_node.value}`")
                else:
                    values[name] = float(value)
        if "version" not in entries:
            self.problem(node, f"{key}.version", "missing; name the candidate's version in the model repository")
            return None
        if any(v is None for v in values.values()):
            return None
        if stable_version is not None and values["version"] == stable_version:
            self.problem(entries["version"][1], f"{key}.version",
                         f"is the stable version ({stable_version}) already; name the new version to try")
            return None
        if values.get("min_calls", RolloutSpec.min_calls) > values.get("window", RolloutSpec.window):
            self.problem(entries.get("min_calls", entries["version"])[1], f"{key}.min_calls",
                         "is larger than `window`; the rollout could never be judged")
            return None
        return RolloutSpec(**values)

    _ROUTE_KEYS = ("primary", "fallback", "validators", "consensus_threshold", "timeout_ms", "options", "examples", "description",
                   "priority")

    def read_routes(self, node: yaml.Node, section: str, fleet: dict[str, ModelSpec]) -> dict[str, RouteSpec]:
        routes: dict[str, RouteSpec] = {}
        seen_examples: dict[str, tuple[str, int]] = {}  # normalised example -> (route, line)
        for name, (_, value_node) in self.mapping(node, section, None).items():
            key = f"{section}.{name}"
            entries = self.mapping(value_node, key, self._ROUTE_KEYS)
            values: dict[str, Any] = {}
            for field_name, (_, field_node) in entries.items():
                dotted = f"{key}.{field_name}"
                if field_name in ("primary", "description"):
                    values[field_name] = self.string(field_node, dotted)
                elif field_name == "priority":
                    values[field_name] = self.string(field_node, dotted, choices=PRIORITIES)
                elif field_name == "examples":
                    values[field_name] = self.examples(field_node, dotted, name, seen_examples)
                elif field_name in ("fallback", "validators", "options"):
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

    MIN_EXAMPLES = 3

    def examples(self, node: yaml.Node, key: str, route: str,
                 seen: dict[str, tuple[str, int]]) -> tuple[str, ...] | None:
        """A route's example requests, each problem on its own line: an empty list or entry, fewer
        than MIN_EXAMPLES, or a request that another route (or this one) already lists: the router
        learns routes from these, and one text taught as two routes only blurs both."""
        items = node.value if isinstance(node, yaml.SequenceNode) else None
        if items is None or not all(isinstance(item, yaml.ScalarNode) for item in items):
            names = self.names(node, key)  # a single string, or not a list of strings at all
            if names is not None:
                self.problem(node, key, f"lists {len(names)} request; give at least {self.MIN_EXAMPLES} "
                                        "examples as a list, or remove `examples:`")
            return None
        if not items:
            self.problem(node, key, f"is empty; list at least {self.MIN_EXAMPLES} example requests, or remove "
                                    "`examples:` (a route without examples is chosen by name only)")
            return None
        texts, ok = [], True
        for item in items:
            text = self.value(item)
            if not isinstance(text, str) or not text.strip():
                self.problem(item, key, "has an empty example; write the request or delete the line")
                ok = False
                continue
            normalised = " ".join(text.casefold().split())
            line = item.start_mark.line + 1
            if normalised in seen:
                other, first = seen[normalised]
                where = "this route" if other == route else f"route `{other}`"
                self.problem(item, key, f"`{text[:60]}` is already an example of {where} (line {first}); "
                                        "an example must teach one route only: keep it once")
                ok = False
                continue
            seen[normalised] = (route, line)
            texts.append(text)
        if ok and len(texts) < self.MIN_EXAMPLES:
            self.problem(node, key, f"has {len(texts)} example{'s' if len(texts) != 1 else ''}; the router needs at "
                                    f"least {self.MIN_EXAMPLES} per route to learn it (and to cross-validate)")
            return None
        return tuple(texts) if ok else None

    def check_models_exist(self, node: yaml.Node, key: str, value: str | tuple[str, ...] | None, fleet: dict[str, ModelSpec]) -> None:
        names = (value,) if isinstance(value, str) else (value or ())
        for model in names:
            if model not in fleet:
                defined = ", ".join(sorted(fleet)) or "none"
                self.problem(node, key, f"model `{model}` is not in `fleet:`; defined models: {defined}")

    # -- security

    _TLS_KEYS = ("cert", "key", "ca", "require_client_cert", "client_cert", "client_key", "server_name")
    _AUTH_KEYS = ("bearer_token_env", "bearer_token_file")
    _SECRET_KEYS = ("router_token", "token", "bearer_token", "password", "secret")

    def read_security(self, node: yaml.Node, path: Path, services: ServicesConfig) -> SecurityConfig:
        entries = self.mapping(node, "security", None)
        for name, (key_node, _) in entries.items():
            if name in self._SECRET_KEYS:
                self.problem(key_node, f"security.{name}",
                             "secrets do not belong in the config file; put the router's token in an environment "
                             "variable and name it under security.auth.bearer_token_env (or keep it in a file and "
                             "name that under security.auth.bearer_token_file)")
            elif name not in ("tls", "auth"):
                hint = difflib.get_close_matches(name, ("tls", "auth"), n=1)
                did_you_mean = f" Did you mean `{hint[0]}`?" if hint else ""
                self.problem(key_node, f"security.{name}", f"unknown key.{did_you_mean} Allowed here: tls, auth")
        tls = self.read_tls(entries["tls"][1], path.parent) if "tls" in entries else None
        targets = services.model_host_targets
        hosts = {t.rpartition(":")[0].strip("[]") for t in targets}
        if tls is not None and not tls.server_name and len(targets) > 1 and len(hosts) > 1:
            self.problem(entries["tls"][1], "security.tls.server_name",
                         f"missing: the router balances over model hosts on several hosts ({', '.join(sorted(hosts))}) "
                         "and checks one name in all their certificates; set `server_name:` to a DNS name "
                         "that every model host's certificate carries")
        token, source = self.read_auth(entries["auth"][1], path.parent) if "auth" in entries else (None, "")
        return SecurityConfig(tls=tls, bearer_token=token, bearer_token_source=source)

    def read_tls(self, node: yaml.Node, base: Path) -> TlsSettings | None:
        entries = self.mapping(node, "security.tls", self._TLS_KEYS)
        values: dict[str, Any] = {}
        for name, (_, value_node) in entries.items():
            dotted = f"security.tls.{name}"
            if name == "require_client_cert":
                values[name] = self.boolean(value_node, dotted)
            elif name == "server_name":
                values[name] = self.string(value_node, dotted)
            else:
                pem = "PRIVATE KEY" if name in ("key", "client_key") else "CERTIFICATE"
                values[name] = self.readable_file(value_node, dotted, base, pem=pem)
        ok = True
        for cert, key in (("cert", "key"), ("client_cert", "client_key")):
            if key in entries and cert not in entries:
                self.problem(entries[key][0], f"security.tls.{cert}",
                             f"missing: `{key}` is given without its certificate; add `{cert}: PATH` (PEM)")
                ok = False
            elif cert in entries and key not in entries:
                self.problem(entries[cert][0], f"security.tls.{key}",
                             f"missing: `{cert}` is given without its private key; add `{key}: PATH` (PEM)")
                ok = False
        if "cert" not in entries and "key" not in entries:
            self.problem(node, "security.tls.cert",
                         "missing: every service serves TLS with `cert` and `key` (PEM files); "
                         "remove `tls:` to run without TLS")
            ok = False
        if values.get("require_client_cert") and "ca" not in entries:
            self.problem(entries["require_client_cert"][1], "security.tls.require_client_cert",
                         "needs `ca: PATH`, the CA certificate that signed the client certificates to accept")
            ok = False
        if not ok or any(v is None for v in values.values()):
            return None
        return TlsSettings(**values)

    _ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
    _TOKEN = re.compile(r"^[\x21-\x7e]+$")
    MIN_TOKEN_LENGTH = 16

    def read_auth(self, node: yaml.Node, base: Path) -> tuple[str | None, str]:
        entries = self.mapping(node, "security.auth", self._AUTH_KEYS)
        if len(entries) != 1:
            where = entries["bearer_token_file"][0] if len(entries) > 1 else node
            self.problem(where, "security.auth",
                         "give exactly one of `bearer_token_env: NAME` (an environment variable that holds the "
                         "router's token) or `bearer_token_file: PATH` (a file that holds it)")
            return None, ""
        name, (_, value_node) = next(iter(entries.items()))
        dotted = f"security.auth.{name}"
        if name == "bearer_token_env":
            variable = self.string(value_node, dotted)
            if variable is None:
                return None, ""
            if not self._ENV_NAME.match(variable):
                self.problem(value_node, dotted, f"`{variable}` is not an environment variable name; "
                                                 "give the variable's name (like MIRADOR_ROUTER_TOKEN), not the token")
                return None, ""
            token = os.environ.get(variable, "").strip()
            source = f"environment variable {variable}"
            if not token:
                self.problem(value_node, dotted, f"the environment variable {variable} is not set or empty; "
                                                 "export it with the router's token before starting the mesh or the CLI")
                return None, ""
        else:
            file = self.readable_file(value_node, dotted, base)
            if file is None:
                return None, ""
            token = file.read_text(encoding="utf-8", errors="replace").strip()
            source = f"file {file}"
            if not token:
                self.problem(value_node, dotted, f"{file} is empty; write the router's token into it")
                return None, ""
        if not self._TOKEN.match(token):
            self.problem(value_node, dotted, f"the token in the {source} has spaces or characters outside "
                                             "printable ASCII; a bearer token is one word of printable ASCII")
            return None, ""
        if len(token) < self.MIN_TOKEN_LENGTH:
            self.problem(value_node, dotted, f"the token in the {source} has {len(token)} characters; use at least "
                                             f"{self.MIN_TOKEN_LENGTH} (for example `python -c 'import secrets; "
                                             "print(secrets.token_urlsafe(32))'`)")
            return None, ""
        return token, source

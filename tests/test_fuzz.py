"""Fuzzing with hypothesis: every RPC of the four services gets generated protobuf messages
(random field values, valid names mixed in so calls reach deep) and random bytes as raw
requests, against real processes serving tiny models. Every answer must be a clear status
(never UNKNOWN or INTERNAL), and every process must be alive and SERVING afterwards.
The YAML config loader gets random documents and mutations of the default config: it
either succeeds or raises ConfigError, never anything else.

bench/fuzz.py runs the same generators for 10,000+ cases and reports every outcome.
"""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

import grpc
import pytest
import yaml
from google.protobuf import descriptor as _descriptor
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mirador.v1 import consensus_pb2, model_host_pb2, quantizer_pb2, rollouts_pb2, router_pb2

from conftest import REPO, write_config
from services.cli.supervisor import Mesh
from services.common.config import ConfigError, MiradorConfig, load_config, parse_config
from services.common.model_repository import ModelRepository
from tiny_models import build_tiny_decoder, build_tiny_encoder

# --------------------------------------------------------------------------- the mesh under test

FLEET = """
fleet:
  tiny-lm: {task: text-generation, tier: hot}
  tiny-lm-b: {task: text-generation, tier: warm, keep_alive: 2s}
  tiny-lm-eos: {task: text-generation, tier: cold}
  tiny-embed: {task: embedding, tier: hot}
routes:
  chat: {primary: tiny-lm, fallback: tiny-lm-b, timeout_ms: 5000}
  greetings: {primary: tiny-lm, examples: [hello there, hi friend, good morning]}
  numbers: {primary: tiny-lm-b, examples: [one two three, count to ten, 42 plus 17]}
  compliance:
    primary: tiny-lm
    validators: [tiny-lm-b]
    consensus_threshold: 0.8
    options: [compliant, non-compliant, needs review]
    timeout_ms: 8000
"""
MODELS = ["tiny-lm", "tiny-lm-b", "tiny-lm-eos", "tiny-embed"]
ROUTES = ["chat", "greetings", "numbers", "compliance"]
OPTIONS = ["compliant", "non-compliant", "needs review", "yes", "no"]
SERVICES = {  # config name → (gRPC service descriptor)
    "router": router_pb2.DESCRIPTOR.services_by_name["Router"],
    "model_host": model_host_pb2.DESCRIPTOR.services_by_name["ModelHost"],
    "consensus": consensus_pb2.DESCRIPTOR.services_by_name["Consensus"],
    "quantizer": quantizer_pb2.DESCRIPTOR.services_by_name["Quantizer"],
}
# Other gRPC services a process serves beside its own: the router hosts rollout control.
ALSO_SERVED = {"router": [rollouts_pb2.DESCRIPTOR.services_by_name["Rollouts"]]}
# Statuses that say nothing to a caller: a malformed request must never get them.
UNCLEAR = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
CALL_TIMEOUT_S = 15.0


@contextlib.contextmanager
def fuzz_mesh(directory: Path):
    """All four services on tiny models, as `mirador up` starts them."""
    repository = ModelRepository(directory / "models")
    build_tiny_decoder(repository, "tiny-lm")
    build_tiny_decoder(repository, "tiny-lm-b", seed=1)
    build_tiny_decoder(repository, "tiny-lm-eos", seed=3, eos_after=3)
    build_tiny_encoder(repository, "tiny-embed")
    config = write_config(directory, body=FLEET, service_extra={
        "router": "embedding_model: tiny-embed\ndefault_route: chat", "model_host": "max_queue_per_model: 64"})
    mesh = Mesh(load_config(config), log_dir=directory / "logs", env={"XDG_CACHE_HOME": str(directory / "cache")})
    try:
        mesh.start(timeout_s=60)
        yield mesh
    finally:
        mesh.stop()


# --------------------------------------------------------------------------- message generators

F = _descriptor.FieldDescriptor
_INT_RANGES = {
    F.TYPE_INT32: (-(2**31), 2**31 - 1), F.TYPE_SINT32: (-(2**31), 2**31 - 1), F.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    F.TYPE_INT64: (-(2**63), 2**63 - 1), F.TYPE_SINT64: (-(2**63), 2**63 - 1), F.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    F.TYPE_UINT32: (0, 2**32 - 1), F.TYPE_FIXED32: (0, 2**32 - 1),
    F.TYPE_UINT64: (0, 2**64 - 1), F.TYPE_FIXED64: (0, 2**64 - 1),
}
NAMES = st.sampled_from(MODELS + ROUTES)
TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", " ", "hello world", "hi", "\x00", "count to ten", "é" * 3, "<|im_start|>", "a" * 40_000]),
)


def _name_like(field_name: str) -> bool:
    return field_name in ("model", "models", "route", "embedding_model", "primary") or field_name.endswith("_model")


def _int_strategy(field_type: int, name: str):
    low, high = _INT_RANGES[field_type]
    small = st.integers(max(low, -3), min(high, 300))
    return st.one_of(small, st.integers(low, high), st.sampled_from([low, high, 0, 1, 4096, 4097]))


def _scalar(field: _descriptor.FieldDescriptor):
    t = field.type
    if t == F.TYPE_STRING:
        if _name_like(field.name):
            return st.one_of(NAMES, TEXT)
        if field.name in ("options", "answer", "label", "resolution"):
            return st.one_of(st.sampled_from(OPTIONS), TEXT)
        return TEXT
    if t == F.TYPE_BYTES:
        return st.binary(max_size=64)
    if t == F.TYPE_BOOL:
        return st.booleans()
    if t == F.TYPE_FLOAT:
        return st.one_of(st.floats(width=32), st.sampled_from([0.0, 0.5, 1.0, -1.0, 2.0]))
    if t == F.TYPE_DOUBLE:
        return st.one_of(st.floats(), st.sampled_from([0.0, 0.5, 1.0, -1.0]))
    if t == F.TYPE_ENUM:
        return st.one_of(st.sampled_from([v.number for v in field.enum_type.values]), st.integers(-(2**31), 2**31 - 1))
    return _int_strategy(t, field.name)


def _is_repeated(field) -> bool:
    return getattr(field, "is_repeated", False) or getattr(field, "label", None) == F.LABEL_REPEATED


@st.composite
def messages(draw, descriptor: _descriptor.Descriptor, depth: int = 0):
    """A message of `descriptor` with a random subset of its fields set to random values."""
    message = message_factory.GetMessageClass(descriptor)()
    for field in descriptor.fields:
        if not draw(st.booleans()):
            continue
        if field.type == F.TYPE_MESSAGE:
            if depth >= 3:
                continue
            if _is_repeated(field):
                for item in draw(st.lists(messages(field.message_type, depth + 1), max_size=3)):
                    getattr(message, field.name).add().CopyFrom(item)
            else:
                getattr(message, field.name).CopyFrom(draw(messages(field.message_type, depth + 1)))
        elif _is_repeated(field):
            getattr(message, field.name).extend(draw(st.lists(_scalar(field), max_size=5)))
        else:
            setattr(message, field.name, draw(_scalar(field)))
    return message


def methods(service: _descriptor.ServiceDescriptor):
    return [(f"/{service.full_name}/{m.name}", m) for m in service.methods]


ALL_METHODS = [(name, path, method) for name, service in SERVICES.items()
               for served in (service, *ALSO_SERVED.get(name, ())) for path, method in methods(served)]


USER_TEXT = st.one_of(st.sampled_from(["hello there", "count to ten", "is this compliant?", "hi"]), st.text(max_size=30))


@st.composite
def _sampling(draw):
    from mirador.v1 import common_pb2

    return common_pb2.SamplingParams(
        max_tokens=draw(st.integers(0, 24)), temperature=draw(st.sampled_from([0.0, 0.7, 1.5])),
        top_p=draw(st.sampled_from([0.0, 0.9, 1.0])), stop=draw(st.lists(st.sampled_from(["\n", "the", "x"]), max_size=2)),
        **({"seed": draw(st.integers(0, 2**64 - 1))} if draw(st.booleans()) else {}))


@st.composite
def _chat(draw):
    from mirador.v1 import common_pb2

    roles = st.sampled_from([common_pb2.ROLE_SYSTEM, common_pb2.ROLE_USER, common_pb2.ROLE_ASSISTANT])
    turns = draw(st.lists(st.tuples(roles, USER_TEXT), min_size=0, max_size=3))
    return [common_pb2.ChatMessage(role=role, content=text) for role, text in turns] + [
        common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=draw(USER_TEXT))]


# Near-valid requests, so that calls get past validation into routing, loading, inference and voting.
VALID = {
    "/mirador.v1.ModelHost/Generate": lambda d: model_host_pb2.GenerateRequest(
        model=d(st.sampled_from(["tiny-lm", "tiny-lm-b", "tiny-lm-eos"])), messages=d(_chat()), sampling=d(_sampling())),
    "/mirador.v1.ModelHost/Score": lambda d: model_host_pb2.ScoreRequest(
        model=d(st.sampled_from(["tiny-lm", "tiny-lm-b"])), messages=d(_chat()),
        options=d(st.lists(st.sampled_from(OPTIONS), min_size=2, max_size=4, unique=True))),
    "/mirador.v1.ModelHost/Embed": lambda d: model_host_pb2.EmbedRequest(
        model="tiny-embed", texts=d(st.lists(USER_TEXT, min_size=1, max_size=6))),
    "/mirador.v1.ModelHost/LoadModel": lambda d: model_host_pb2.LoadModelRequest(model=d(st.sampled_from(MODELS))),
    "/mirador.v1.ModelHost/UnloadModel": lambda d: model_host_pb2.UnloadModelRequest(model=d(st.sampled_from(MODELS))),
    "/mirador.v1.Router/Ask": lambda d: router_pb2.AskRequest(
        text=d(USER_TEXT), route=d(st.sampled_from(["", *ROUTES])), sampling=d(_sampling()),
        session_id=d(st.sampled_from(["", "s1", "s2"]))),
    "/mirador.v1.Router/Route": lambda d: router_pb2.RouteRequest(text=d(USER_TEXT), route=d(st.sampled_from(["", *ROUTES]))),
    "/mirador.v1.Consensus/Decide": lambda d: consensus_pb2.DecideRequest(
        route="compliance", models=d(st.sampled_from([["tiny-lm", "tiny-lm-b"], ["tiny-lm-b", "tiny-lm", "tiny-lm-eos"]])),
        messages=d(_chat()), options=d(st.sampled_from([[], OPTIONS[:3], ["yes", "no"]])),
        consensus_threshold=d(st.sampled_from([0.5, 0.8, 1.0])), sampling=d(_sampling())),
    "/mirador.v1.Consensus/ListEscalations": lambda d: consensus_pb2.ListEscalationsRequest(),
    "/mirador.v1.Rollouts/Rollback": lambda d: rollouts_pb2.RolloutActionRequest(
        model=d(st.sampled_from(MODELS)), reason=d(USER_TEXT)),
}


@st.composite
def requests(draw, service_names=tuple(SERVICES)):
    """(service, RPC path, method descriptor, payload bytes): random bytes (1 in 8), a near-valid
    message (3 in 8, where the RPC has a template; half of them with random fields merged in),
    or a message with random fields."""
    name, path, method = draw(st.sampled_from([m for m in ALL_METHODS if m[0] in service_names]))
    kind = draw(st.integers(0, 7))
    if kind == 0:
        payload = draw(st.binary(max_size=200))
    elif kind <= 3 and path in VALID:
        message = VALID[path](draw)
        if draw(st.booleans()):
            message.MergeFrom(draw(messages(method.input_type)))
        payload = message.SerializeToString()
    else:
        payload = draw(messages(method.input_type)).SerializeToString()
    return name, path, method, payload


def call(channel: grpc.Channel, path: str, method, payload: bytes, timeout_s: float = CALL_TIMEOUT_S):
    """Sends raw request bytes; returns (status code, details), reading a stream to its end."""
    identity = lambda data: data  # noqa: E731
    try:
        if method.server_streaming:
            for _ in channel.unary_stream(path, request_serializer=identity, response_deserializer=identity)(
                    payload, timeout=timeout_s):
                pass
        else:
            channel.unary_unary(path, request_serializer=identity, response_deserializer=identity)(payload, timeout=timeout_s)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def alive_and_serving(mesh: Mesh) -> dict[str, str]:
    """{service: problem} for every process that is not running and SERVING."""
    problems = {}
    for name, service in mesh.processes.items():
        if service.process.poll() is not None:
            problems[name] = f"exited with {service.process.returncode}; log ends:\n{service.log_tail()}"
            continue
        with grpc.insecure_channel(service.settings.address) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            except grpc.RpcError as exc:
                problems[name] = f"health check failed: {exc.code().name}"
                continue
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            problems[name] = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return problems


# --------------------------------------------------------------------------- config generators

DEFAULT_CONFIG_TEXT = (REPO / "config" / "mirador.yaml").read_text()
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=20),
                    st.sampled_from(["5m", "30s", "hot", "cold", "text-generation", "tiny-lm", "-1", "1e400", "~"]))
YAML_VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.text(max_size=12), st.integers()), inner, max_size=4)),
    max_leaves=12)
ODD_YAML = st.sampled_from([
    "!!python/object:os.system x", "!custom 3", "!!binary aGVsbG8=", "!!set {a, b}", "!!timestamp 2001-12-14",
    "&a [*a]", "{? [1, 2]: x}", "*undefined", "'unterminated", "[1, 2", "{a: 1, a: 2}", "!!float nan", ".inf",
    "- &x 1\n- *x", "<<: {a: 1}", "!!omap [a: 1]", "!!pairs [a: 1]", "0x1F", "0o17", "1_000", "null", "~",
])


def _paths(data, prefix=()):
    """Every key path in nested dicts/lists."""
    yield prefix
    if isinstance(data, dict):
        for key, value in data.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            yield from _paths(value, (*prefix, index))


def _replace(data, path, value):
    if not path:
        return value
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return data


@st.composite
def config_documents(draw) -> str:
    """A YAML text: a random document, the default config with a value replaced or lines
    mutated, a small valid config with one odd YAML fragment, or random text."""
    kind = draw(st.integers(0, 4))
    if kind == 0:
        return yaml.safe_dump(draw(YAML_VALUES), allow_unicode=True)
    if kind == 1:
        data = yaml.safe_load(DEFAULT_CONFIG_TEXT)
        path = draw(st.sampled_from(list(_paths(data))))
        return yaml.safe_dump(_replace(data, path, draw(st.one_of(YAML_VALUES, st.just(None)))), allow_unicode=True)
    if kind == 2:
        lines = DEFAULT_CONFIG_TEXT.splitlines()
        rng = random.Random(draw(st.integers(0, 2**32)))
        for _ in range(draw(st.integers(1, 4))):
            lines = lines or [""]  # an earlier truncation and deletion may have emptied it
            index = rng.randrange(len(lines))
            action = rng.randrange(5)
            if action == 0:
                del lines[index]
            elif action == 1:
                lines.insert(index, lines[rng.randrange(len(lines))])
            elif action == 2:
                column = rng.randrange(len(lines[index]) + 1)
                lines[index] = lines[index][:column] + draw(st.text(max_size=3)) + lines[index][column:]
            elif action == 3:
                key, sep, _ = lines[index].partition(":")
                if sep:
                    lines[index] = f"{key}: {draw(ODD_YAML)}"
            else:
                lines = lines[:index]
        return "\n".join(lines) + "\n"
    if kind == 3:
        fragment = draw(ODD_YAML)
        key = draw(st.sampled_from(["port", "tier", "keep_alive", "primary", "examples", "min_confidence",
                                    "rate_limit_per_client", "max_queue_per_model", "priority", "database_url",
                                    "redis_url"]))
        template = {
            "port": "services:\n  router:\n    port: {v}\nfleet:\n  m: {{task: text-generation}}\n",
            "rate_limit_per_client": "services:\n  router:\n    rate_limit_per_client: {v}\nfleet:\n  m: {{task: text-generation}}\n",
            "max_queue_per_model": "services:\n  model_host:\n    max_queue_per_model: {v}\nfleet:\n  m: {{task: text-generation}}\n",
            "min_confidence": "services:\n  router:\n    min_confidence: {v}\nfleet:\n  m: {{task: text-generation}}\n",
            "tier": "fleet:\n  m:\n    task: text-generation\n    tier: {v}\n",
            "keep_alive": "fleet:\n  m:\n    task: text-generation\n    keep_alive: {v}\n",
            "primary": "fleet:\n  m: {{task: text-generation}}\nroutes:\n  r:\n    primary: {v}\n",
            "examples": "fleet:\n  m: {{task: text-generation}}\nroutes:\n  r:\n    primary: m\n    examples: {v}\n",
            "priority": "fleet:\n  m: {{task: text-generation}}\nroutes:\n  r:\n    primary: m\n    priority: {v}\n",
            "database_url": "fleet:\n  m: {{task: text-generation}}\nstate:\n  database_url: {v}\n",
            "redis_url": "fleet:\n  m: {{task: text-generation}}\nstate:\n  redis_url: {v}\n  redis_prefix: {v}\n",
        }[key]
        return template.format(v=fragment)
    return draw(st.text(max_size=200))


def check_config_text(text: str) -> str:
    """Loads `text`; returns "ok" or "ConfigError". Any other exception propagates (a crash)."""
    try:
        result = parse_config(text, "fuzz.yaml")
    except ConfigError as exc:
        assert exc.problems and all(str(p) for p in exc.problems)
        return "ConfigError"
    assert isinstance(result, MiradorConfig)
    return "ok"


# --------------------------------------------------------------------------- tests

FUZZ_SETTINGS = settings(max_examples=70, deadline=None, database=None, derandomize=True,
                         suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    with fuzz_mesh(tmp_path_factory.mktemp("fuzz")) as mesh:
        yield mesh


@pytest.fixture(scope="module")
def channels(mesh):
    opened = {name: grpc.insecure_channel(getattr(mesh.config.services, name).address) for name in SERVICES}
    yield opened
    for channel in opened.values():
        channel.close()


@pytest.mark.parametrize("service", list(SERVICES))
def test_every_rpc_answers_generated_requests_with_a_clear_status(mesh, channels, service):
    @FUZZ_SETTINGS
    @given(requests((service,)))
    def fuzz(case):
        name, path, method, payload = case
        code, details = call(channels[name], path, method, payload)
        assert code not in UNCLEAR, f"{path} answered {code.name}: {details!r} to {payload[:200]!r}"
        assert code == grpc.StatusCode.OK or details.strip(), f"{path} answered {code.name} without a sentence"
        # a status message too long for the client's metadata limit turns into a misleading RESOURCE_EXHAUSTED
        assert "metadata size exceeds" not in details, f"{path}: the status message was too long: {details!r}"

    fuzz()
    assert alive_and_serving(mesh) == {}


@FUZZ_SETTINGS
@given(config_documents())
def test_the_config_loader_answers_every_document_with_config_error_or_a_config(text):
    check_config_text(text)


def test_config_loader_edge_cases():
    for text in ["", "~", "[]", "- 1", "fleet: !custom x", "fleet:\n  m: {task: !!binary aGVsbG8=}",
                 "fleet: {m: {task: text-generation}}\nroutes: {r: {primary: m, examples: !!set {a, b}}}",
                 "&a [*a]", "services: {router: {port: 1e400}}\nfleet: {}",
                 "services: {router: {rate_limit_per_client: .nan}}\nfleet: {m: {task: text-generation}}"]:
        check_config_text(text)


def test_an_undefined_role_number_gets_invalid_argument(channels):
    """Found by bench/fuzz.py: roles are an open proto3 enum, so 763 decodes fine and must be refused."""
    from mirador.v1 import common_pb2

    request = model_host_pb2.ScoreRequest(model="tiny-lm", options=["yes", "no"], messages=[
        common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="hi"), common_pb2.ChatMessage(role=763, content="x")])
    method = SERVICES["model_host"].methods_by_name["Score"]
    code, details = call(channels["model_host"], "/mirador.v1.ModelHost/Score", method, request.SerializeToString())
    assert code == grpc.StatusCode.INVALID_ARGUMENT, f"{code.name}: {details}"


def test_an_oversized_option_gets_invalid_argument_not_an_allocation_failure(channels):
    """Found by bench/fuzz.py: a 40 KB option made ONNX Runtime's arena fail (INTERNAL)."""
    from mirador.v1 import common_pb2

    method = SERVICES["model_host"].methods_by_name["Score"]

    def score(options, content="is this compliant?"):
        request = model_host_pb2.ScoreRequest(model="tiny-lm-b", options=options, messages=[
            common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=content)])
        return call(channels["model_host"], "/mirador.v1.ModelHost/Score", method, request.SerializeToString())

    code, details = score(["compliant", "a" * 40_000])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "at most 1024 bytes" in details, (code, details)
    # within the byte limit, but the prompt and the option together exceed what the model reads
    code, details = score(["compliant", "ab " * 330], content="word " * 900)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "longer than this model reads" in details, (code, details)


def test_a_nul_byte_in_a_calibration_path_gets_invalid_argument(channels):
    """Found by bench/fuzz.py: Path operations raise ValueError on NUL bytes (was INTERNAL)."""
    request = quantizer_pb2.AnalyzeRequest(model="tiny-lm", calibration_path="\x00")
    method = SERVICES["quantizer"].methods_by_name["Analyze"]
    code, details = call(channels["quantizer"], "/mirador.v1.Quantizer/Analyze", method, request.SerializeToString())
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "calibration_path" in details, (code, details)

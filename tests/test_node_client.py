"""examples/node: a Node.js client built only from protos/ (@grpc/proto-loader at run
time) talks to a real router and model host."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from conftest import REPO, write_config
from services.cli.supervisor import Mesh
from services.common.config import load_config

EXAMPLE = REPO / "examples" / "node"
NODE = shutil.which("node")

pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed (Debian: apt-get install nodejs npm)")


@pytest.fixture(scope="module")
def node_modules():
    if not (EXAMPLE / "node_modules" / "@grpc" / "grpc-js").exists():
        npm = shutil.which("npm")
        if npm is None:
            pytest.fail("examples/node/node_modules is missing and npm is not installed; "
                        "run scripts/install-system-deps.sh")
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=EXAMPLE, check=True, timeout=300)
    return EXAMPLE / "node_modules"


@pytest.fixture(scope="module")
def router_and_host(tmp_path_factory):
    directory = tmp_path_factory.mktemp("node")
    mesh = Mesh(load_config(write_config(directory)), log_dir=directory / "logs", services=("router", "model_host"))
    mesh.start()
    yield mesh
    mesh.stop()


def run_client(mesh, *extra: str) -> subprocess.CompletedProcess:
    services = mesh.config.services
    return subprocess.run(
        [NODE, "client.js", "--model-host", services.model_host.address, "--router", services.router.address, *extra],
        cwd=EXAMPLE, capture_output=True, text=True, timeout=60,
    )


def test_node_client_lists_models_routes_and_asks(node_modules, router_and_host):
    # No model is built in this test mesh: Ask reaches the model host through the router
    # and comes back FAILED_PRECONDITION (or UNIMPLEMENTED where inference is not built).
    done = run_client(router_and_host, "--route", "chat", "--tolerate-ask", "UNIMPLEMENTED,FAILED_PRECONDITION")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert {m["name"] for m in result["list_models"]["models"]} == {"tiny-lm", "tiny-lm-b", "tiny-embed"}
    assert result["route"]["route"] == "chat" and result["route"]["model"] == "tiny-lm"
    assert result["route"]["reason"] == "ROUTE_REASON_EXPLICIT"
    assert result["ask"]["status"] in ("OK", "UNIMPLEMENTED", "FAILED_PRECONDITION"), result["ask"]
    if result["ask"]["status"] != "OK":
        assert "on the model host" in result["ask"]["details"]
    assert result["ask"]["events"][0]["route"]["route"] == "chat"  # the router's decision streams first


def test_node_client_exits_non_zero_on_an_rpc_error(node_modules, router_and_host):
    done = run_client(router_and_host, "--route", "no-such-route", "--no-ask")
    assert done.returncode == 1
    assert "NOT_FOUND" in done.stderr and "no-such-route" in done.stderr
    assert done.stdout == ""


def test_node_client_does_not_tolerate_an_ask_status_it_was_not_told_to(node_modules, router_and_host):
    done = run_client(router_and_host, "--route", "chat", "--tolerate-ask", "")
    assert done.returncode == 1 and "Ask:" in done.stderr

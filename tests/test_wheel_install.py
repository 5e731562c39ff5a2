"""A non-editable install carries everything Mirador reads at run time: the wheel, installed into
a fresh venv and run from outside the source tree, checks its packaged default config and serves
it with `mirador up`, the fitted score calibrations included. Needs the built fleet."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import grpc
import pytest
import yaml
from mirador.v1 import common_pb2, model_host_pb2, model_host_pb2_grpc

from conftest import REPO, free_port
from services.common.model_repository import ModelNotFoundError, ModelRepository

pytestmark = pytest.mark.real_model

CALIBRATED_MEMBER = "smollm2-135m-instruct-fused"  # a compliance voter with a packaged calibration file


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """bin/ of a fresh venv holding the mirador wheel; its dependencies are this environment's
    (a .pth line), not a copy: what is tested is what the wheel carries."""
    try:
        ModelRepository().get(CALIBRATED_MEMBER)
    except ModelNotFoundError:
        pytest.skip(f"{CALIBRATED_MEMBER} is not built; run `mirador fleet build`")
    root = tmp_path_factory.mktemp("wheel")
    # Built from a copy of the files git would commit: an in-tree build/ could carry modules
    # deleted since into the wheel, and nothing is written into the checkout.
    source = root / "source"
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for relative in filter(None, listed):
        origin = REPO / relative
        if origin.is_file() and not origin.is_symlink():
            (source / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, source / relative)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(root / "dist"), str(source)], check=True, cwd=root)
    wheel = next((root / "dist").glob("mirador-*.whl"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([venv / "bin" / "python", "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
                   check=True, cwd=root)
    site = subprocess.run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (Path(site) / "mirador_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv / "bin"


def test_the_installed_package_checks_its_packaged_default_config(installed, tmp_path):
    where = subprocess.run([installed / "python", "-c", "import services; print(services.__file__)"],
                           check=True, capture_output=True, text=True, cwd=tmp_path).stdout
    assert str(REPO) not in where  # the wheel's copy, not the source tree
    checked = subprocess.run([installed / "mirador", "config", "check"], capture_output=True, text=True, cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert "defaults/mirador.yaml: ok" in checked.stdout and str(REPO) not in checked.stdout


def test_the_installed_package_serves_the_default_config(installed, tmp_path):
    defaults = Path(subprocess.run([installed / "python", "-c", "import services.defaults as d; print(d.DEFAULT_CONFIG_PATH)"],
                                   check=True, capture_output=True, text=True, cwd=tmp_path).stdout.strip())
    config = yaml.safe_load(defaults.read_text())
    for name in ("router", "consensus", "quantizer", "model_host", "gateway"):  # free ports, own state
        config["services"][name] = {**(config["services"].get(name) or {}), "port": free_port(), "metrics_port": 0}
    config["services"]["consensus"]["escalation_db"] = str(tmp_path / "escalations.sqlite3")
    config["services"]["router"]["rollout_state"] = str(tmp_path / "rollouts.json")
    path = tmp_path / "mirador.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))

    up = subprocess.Popen([installed / "mirador", "--config", str(path), "up", "--timeout", "180",
                           "--log-dir", str(tmp_path / "logs")],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    try:
        lines = []
        for line in up.stdout:
            lines.append(line)
            if line.startswith("Ctrl-C") or up.poll() is not None:
                break
        assert "all services SERVING" in "".join(lines), "".join(lines)
        address = f"127.0.0.1:{config['services']['model_host']['port']}"
        with grpc.insecure_channel(address) as channel:
            reply = model_host_pb2_grpc.ModelHostStub(channel).Score(model_host_pb2.ScoreRequest(
                model=CALIBRATED_MEMBER, options=["yes", "no"],
                messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="Is water wet?")]), timeout=120)
        # the calibration file came with the wheel: the host says it applied it
        assert "temperature" in reply.confidence.calibration_source, reply.confidence.calibration_source
        up.send_signal(signal.SIGTERM)
        up.stdout.read()
        assert up.wait(60) == 0
    finally:
        if up.poll() is None:
            up.kill()

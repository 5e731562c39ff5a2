"""An execution provider named in the config that this onnxruntime build lacks stops the model
host at start with a config error, instead of serving silently on the CPU."""

from __future__ import annotations

import subprocess
import sys

import onnxruntime as ort
import pytest

from conftest import write_config
from services.common.server import EXIT_CONFIG_ERROR


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="this machine has CUDA")
def test_an_unavailable_provider_is_an_error_at_start(tmp_path):
    config = write_config(tmp_path, {"model_host": "execution_providers: [CUDAExecutionProvider, CPUExecutionProvider]"},
                          body="fleet: {}\nroutes: {}\n")
    done = subprocess.run([sys.executable, "-m", "services.model_host", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == EXIT_CONFIG_ERROR
    assert "services.model_host.execution_providers" in done.stderr
    assert "CUDAExecutionProvider not available" in done.stderr

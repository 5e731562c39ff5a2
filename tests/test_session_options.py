"""The model host's ONNX Runtime session options come from its settings: threads per session and
whether idle threads spin (off by default: bench/thread_spinning.py)."""

from __future__ import annotations

import pytest

from conftest import write_config
from services.common.config import ConfigError, load_config
from services.common.model_repository import ModelRepository
from services.model_host.loader import SessionSettings, load_runtime
from tiny_models import build_tiny_decoder

SPINNING = "session.intra_op.allow_spinning"


@pytest.mark.parametrize("spinning, entry", [(False, "0"), (True, "1")])
def test_thread_spinning_reaches_the_session(tmp_path, spinning, entry):
    repository = ModelRepository(tmp_path / "models")
    build_tiny_decoder(repository, "tiny-lm")
    runtime = load_runtime(repository.get("tiny-lm"), SessionSettings(thread_spinning=spinning, intra_op_threads=1))
    options = runtime.session.get_session_options()
    assert options.get_session_config_entry(SPINNING) == entry
    assert options.intra_op_num_threads == 1


def test_thread_spinning_is_off_unless_the_config_turns_it_on(tmp_path):
    assert load_config(write_config(tmp_path, body="fleet: {}\nroutes: {}\n")).services.model_host.thread_spinning is False
    on = write_config(tmp_path, {"model_host": "thread_spinning: true"}, body="fleet: {}\nroutes: {}\n")
    assert load_config(on).services.model_host.thread_spinning is True
    wrong = write_config(tmp_path, {"model_host": "thread_spinning: sometimes"}, body="fleet: {}\nroutes: {}\n")
    with pytest.raises(ConfigError, match="thread_spinning"):
        load_config(wrong)

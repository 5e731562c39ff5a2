"""The model host's ONNX Runtime session options come from its settings: threads per session and
when idle threads spin (never by default; or between a run's operators only; or always:
bench/thread_spinning.py)."""

from __future__ import annotations

import pytest

from conftest import write_config
from services.common.config import ConfigError, load_config
from services.common.model_repository import ModelRepository
from services.model_host.loader import SessionSettings, load_runtime
from tiny_models import build_tiny_decoder

SPINNING = "session.intra_op.allow_spinning"
STOP_AFTER_RUN = "session.force_spinning_stop"


@pytest.mark.parametrize("mode, spinning, stops", [("off", "0", False), ("during_runs", "1", True),
                                                   ("always", "1", False)])
def test_the_spinning_mode_reaches_the_session(tmp_path, mode, spinning, stops):
    repository = ModelRepository(tmp_path / "models")
    build_tiny_decoder(repository, "tiny-lm")
    runtime = load_runtime(repository.get("tiny-lm"), SessionSettings(thread_spinning=mode, intra_op_threads=1))
    options = runtime.session.get_session_options()
    assert options.get_session_config_entry(SPINNING) == spinning
    if stops:
        assert options.get_session_config_entry(STOP_AFTER_RUN) == "1"
    else:
        with pytest.raises(Exception):  # not set: ONNX Runtime keeps spinning after a run (or never spins)
            options.get_session_config_entry(STOP_AFTER_RUN)
    assert options.intra_op_num_threads == 1


def test_an_unknown_spinning_mode_is_refused_at_load(tmp_path):
    repository = ModelRepository(tmp_path / "models")
    build_tiny_decoder(repository, "tiny-lm")
    with pytest.raises(ValueError, match="thread_spinning `sometimes` is not one of off, during_runs, always"):
        load_runtime(repository.get("tiny-lm"), SessionSettings(thread_spinning="sometimes"))


@pytest.mark.parametrize("written, read", [("true", "always"), ("false", "off"), ("always", "always"),
                                           ("off", "off"), ("during_runs", "during_runs")])
def test_the_config_names_a_spinning_mode_or_a_boolean(tmp_path, written, read):
    path = write_config(tmp_path, {"model_host": f"thread_spinning: {written}"}, body="fleet: {}\nroutes: {}\n")
    assert load_config(path).services.model_host.thread_spinning == read


def test_spinning_is_off_unless_the_config_turns_it_on(tmp_path):
    default = load_config(write_config(tmp_path, body="fleet: {}\nroutes: {}\n")).services.model_host
    assert default.thread_spinning == "off"
    wrong = write_config(tmp_path, {"model_host": "thread_spinning: sometimes"}, body="fleet: {}\nroutes: {}\n")
    with pytest.raises(ConfigError, match="thread_spinning.*use one of: off, during_runs, always"):
        load_config(wrong)

"""The model host's ONNX Runtime session options come from its settings: threads per session and
when idle threads spin (never by default; or between a run's operators only, alone or with the
process's runs taking turns; or always: bench/thread_spinning.py)."""

from __future__ import annotations

import math
import threading
import time

import pytest

from conftest import write_config
from services.common.config import ConfigError, load_config
from services.common.model_repository import ModelRepository
from services.model_host.loader import SessionSettings, load_runtime
from services.model_host.run_turns import BUSY_SHARE_TAU_S, PROCESS_TURNS, RunTurns
from tiny_models import build_tiny_decoder

SPINNING = "session.intra_op.allow_spinning"
STOP_AFTER_RUN = "session.force_spinning_stop"


@pytest.mark.parametrize("mode, spinning, stops", [("off", "0", False), ("during_runs", "1", True),
                                                   ("in_turn", "1", True), ("always", "1", False)])
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
    with pytest.raises(ValueError, match="thread_spinning `sometimes` is not one of off, during_runs, in_turn, always"):
        load_runtime(repository.get("tiny-lm"), SessionSettings(thread_spinning="sometimes"))


@pytest.mark.parametrize("written, read", [("true", "always"), ("false", "off"), ("always", "always"),
                                           ("off", "off"), ("during_runs", "during_runs"),
                                           ("in_turn", "in_turn")])
def test_the_config_names_a_spinning_mode_or_a_boolean(tmp_path, written, read):
    path = write_config(tmp_path, {"model_host": f"thread_spinning: {written}"}, body="fleet: {}\nroutes: {}\n")
    assert load_config(path).services.model_host.thread_spinning == read


def test_runs_take_turns_unless_the_config_says_otherwise(tmp_path):
    default = load_config(write_config(tmp_path, body="fleet: {}\nroutes: {}\n")).services.model_host
    assert default.thread_spinning == "in_turn"
    wrong = write_config(tmp_path, {"model_host": "thread_spinning: sometimes"}, body="fleet: {}\nroutes: {}\n")
    with pytest.raises(ConfigError, match="thread_spinning.*use one of: off, during_runs, in_turn, always"):
        load_config(wrong)


def test_in_turn_runs_wait_while_another_run_holds_the_turn(tmp_path):
    """`in_turn`: a session's run waits while any run of the process holds the turn, then goes."""
    repository = ModelRepository(tmp_path / "models")
    build_tiny_decoder(repository, "tiny-lm")
    runtime = load_runtime(repository.get("tiny-lm"), SessionSettings(thread_spinning="in_turn", intra_op_threads=1))
    ids = runtime.encode("hello")
    finished = threading.Event()

    def run() -> None:
        runtime.prefill(ids)
        finished.set()

    with PROCESS_TURNS.turn():
        thread = threading.Thread(target=run)
        thread.start()
        assert not finished.wait(0.5), "a run went ahead while another held the turn"
    assert finished.wait(10), "the run never got its turn"
    thread.join()


def test_turns_go_to_the_oldest_waiter_first():
    """A thread that asks again at once (an engine's loop) queues behind the threads already waiting."""
    turns = RunTurns()
    order: list[str] = []
    inside: list[int] = []
    started = threading.Barrier(4)

    def worker(name: str, runs: int) -> None:
        started.wait()
        for _ in range(runs):
            with turns.turn():
                inside.append(1)
                assert len(inside) == 1, "two runs held the turn at once"
                order.append(name)
                time.sleep(0.05)  # longer than a woken thread takes to queue again
                inside.pop()

    with turns.turn():  # everyone queues behind this turn, in the order they arrive
        threads = [threading.Thread(target=worker, args=(name, 5)) for name in "abc"]
        for thread in threads:
            thread.start()
        started.wait()
        time.sleep(0.2)
    for thread in threads:
        thread.join()
    assert len(order) == 15
    # after the first round, the turn rotates: no thread runs twice while another is waiting
    assert all(order[i] != order[i + 1] for i in range(len(order) - 1)), order


def test_the_turns_say_how_busy_the_cores_were_lately():
    now = [0.0]
    turns = RunTurns(clock=lambda: now[0])
    assert turns.busy_share() == 0.0
    with turns.turn():
        now[0] += 10 * BUSY_SHARE_TAU_S  # one long run: busy all along
        assert turns.busy_share() > 0.99
    now[0] += BUSY_SHARE_TAU_S  # free for one time constant
    assert turns.busy_share() == pytest.approx(math.exp(-1), abs=1e-3)
    for _ in range(3000):  # then runs of 3 ms with 1 ms between them, 12 s: busy 3/4 of the time
        with turns.turn():
            now[0] += 0.003
        now[0] += 0.001
    assert turns.busy_share() == pytest.approx(0.75, abs=0.01)

"""A request through the router to a real model host and back, as `mirador ask` sends it."""

import json
import subprocess
import sys

import pytest

from conftest import write_config
from services.cli.supervisor import Mesh
from services.common.config import load_config
from services.common.model_repository import ModelRepository
from tiny_models import build_tiny_decoder, chat_tokenizer, chatml, greedy_reference

FLEET = """
fleet:
  tiny-lm: {task: text-generation, tier: hot}
routes:
  chat: {primary: tiny-lm, timeout_ms: 10000}
"""


@pytest.fixture(scope="module")
def mesh_with_model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ask")
    repository = ModelRepository(directory / "models")
    build_tiny_decoder(repository, "tiny-lm")
    config_path = write_config(directory, body=FLEET)
    mesh = Mesh(load_config(config_path), log_dir=directory / "logs", services=("router", "model_host"),
                env={"XDG_CACHE_HOME": str(directory / "cache")})  # optimised graphs stay in the test's folder
    mesh.start()
    try:
        yield mesh, repository
    finally:
        mesh.stop()


def test_mirador_ask_streams_the_model_answer_through_the_router(mesh_with_model):
    mesh, repository = mesh_with_model
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "--config", str(mesh.config.path), "ask", "hello world",
         "--route", "chat", "--max-tokens", "8", "--json"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    events = json.loads(result.stdout)
    assert list(events[0]) == ["route"] and events[0]["route"]["model"] == "tiny-lm"
    tokens = [e["token"] for e in events if "token" in e]
    summary = events[-1]["summary"]
    ids = chat_tokenizer().encode(chatml([("user", "hello world")]), add_special_tokens=False).ids
    assert [t.get("token_id", 0) for t in tokens] == greedy_reference(repository.get("tiny-lm"), ids, 8)
    assert summary["model"] == "tiny-lm" and summary["route"] == "chat"
    assert summary["text"] == "".join(t.get("text", "") for t in tokens)
    assert summary["confidence"]["calibration_source"]


def test_mirador_ask_prints_route_answer_and_confidence(mesh_with_model):
    mesh, _ = mesh_with_model
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "--config", str(mesh.config.path), "ask", "hello", "--route", "chat",
         "--max-tokens", "4"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("[route chat → tiny-lm")
    assert "[answered by tiny-lm; mean logprob" in result.stdout

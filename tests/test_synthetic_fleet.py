"""bench/synthetic_fleet.py makes models of the asked size that the model host loads and runs:
a BERT encoder (Embed) and a llama decoder (the fused graph, one forward pass), built into a
temporary repository. Uses the real fleet's tokenizers; skipped when it is not built."""

import sys
from pathlib import Path

import numpy as np
import pytest

from services.common.model_repository import ModelNotFoundError, ModelRepository, default_repository_root
from services.model_host.loader import SessionSettings, load_runtime

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import synthetic_fleet  # noqa: E402


@pytest.fixture(scope="module")
def real():
    repository = ModelRepository(default_repository_root())
    for name in (synthetic_fleet.ENCODER_TOKENIZER_FROM, synthetic_fleet.DECODER_TOKENIZER_FROM):
        try:
            repository.get(name)
        except ModelNotFoundError:
            pytest.skip(f"{name} is not built (its tokenizer is reused); run `mirador fleet build --only {name}`")
    return repository


def shape(label):
    return next(s for s in synthetic_fleet.SHAPES if s.label == label)


def test_a_synthetic_encoder_has_its_size_and_embeds(real, tmp_path):
    bert = shape("bert-mini")
    manifest = synthetic_fleet.build_one(ModelRepository(tmp_path), real, "synthetic-bert-mini-01", bert, 1,
                                         warm_cache=False)
    assert manifest.task == "embedding" and manifest.source["kind"] == "synthetic"
    assert manifest.size_bytes == pytest.approx(bert.megabytes * 2**20, rel=0.05)
    runtime = load_runtime(manifest, SessionSettings())
    vectors = runtime.embed(["Is the claim payable?", "hello"])
    assert vectors.shape == (2, bert.hidden) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-4)
    assert not np.allclose(vectors[0], vectors[1])


def test_a_synthetic_decoder_has_its_size_and_runs(real, tmp_path):
    llama = shape("llama-h256")
    manifest = synthetic_fleet.build_one(ModelRepository(tmp_path), real, "synthetic-llama-h256-01", llama, 2,
                                         warm_cache=False)
    assert manifest.task == "text-generation" and manifest.generation["num_layers"] == llama.layers
    assert manifest.size_bytes == pytest.approx(llama.megabytes * 2**20, rel=0.08)
    assert manifest.size_bytes <= 200 * 2**20
    runtime = load_runtime(manifest, SessionSettings())
    ids = runtime.encode(runtime.render_chat([("user", "hello")]))
    session = runtime.session
    feeds = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64),
             "logits_to_keep": np.array([1], np.int64)}
    cache = (1, llama.kv_heads, 64, llama.hidden // llama.heads)
    for name in runtime.past_inputs:
        feeds[name] = np.zeros(cache, np.float32)
    inputs = {i.name for i in session.get_inputs()}
    logits = session.run(["logits"], {k: v for k, v in feeds.items() if k in inputs})[0]
    assert logits.shape[-1] == synthetic_fleet.LLAMA_VOCAB and np.isfinite(logits).all()

"""The tiny test models behave like the real exports: same interface, a KV cache that is
exact, padding that changes nothing, deterministic greedy output, and a working EOS trick."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tokenizers")
pytest.importorskip("onnxruntime")

from services.common.model_repository import ModelRepository  # noqa: E402

from tiny_models import (  # noqa: E402
    IM_END,
    IM_START,
    build_tiny_decoder,
    build_tiny_encoder,
    chat_tokenizer,
    chatml,
    decoder_forward,
    greedy_reference,
    open_session,
    write_corrupt_model,
)

ATOL = 1e-5
REAL_MODELS = Path.home() / ".cache" / "mirador" / "models"


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> ModelRepository:
    return ModelRepository(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def decoder(repository):
    return build_tiny_decoder(repository)


@pytest.fixture(scope="module")
def session(decoder):
    return open_session(decoder)


@pytest.fixture(scope="module")
def prompt_ids() -> list[int]:
    return chat_tokenizer().encode(chatml([("user", "Say hello to the world")]), add_special_tokens=False).ids


# ---------------------------------------------------------------------- interface


def test_decoder_interface_matches_the_optimum_export(session, decoder):
    generation = decoder.generation
    inputs = {i.name: (i.type, i.shape) for i in session.get_inputs()}
    outputs = {o.name: (o.type, o.shape) for o in session.get_outputs()}
    seq, total = ["batch_size", "sequence_length"], ["batch_size", "past_sequence_length + sequence_length"]
    assert list(inputs)[:3] == generation["input_names"]
    assert inputs["input_ids"] == inputs["position_ids"] == ("tensor(int64)", seq)
    assert inputs["attention_mask"] == ("tensor(int64)", total)
    assert outputs["logits"] == ("tensor(float)", [*seq, generation["vocab_size"]])
    for layer in range(generation["num_layers"]):
        for kind in ("key", "value"):
            assert inputs[f"past_key_values.{layer}.{kind}"] == (
                "tensor(float)", ["batch_size", 1, "past_sequence_length", 8])
            assert outputs[f"present.{layer}.{kind}"] == (
                "tensor(float)", ["batch_size", 1, "past_sequence_length + sequence_length", 8])
    assert len(inputs) == 3 + 2 * generation["num_layers"]
    assert len(outputs) == 1 + 2 * generation["num_layers"]


@pytest.mark.parametrize("real_name, builder", [("smollm2-135m-instruct", build_tiny_decoder),
                                                ("minilm-l6", build_tiny_encoder)])
def test_manifest_has_the_same_generation_keys_as_the_real_model(repository, real_name, builder):
    real_path = REAL_MODELS / real_name / "1" / "manifest.json"
    if not real_path.is_file():
        pytest.skip(f"{real_name} is not built here")
    real = json.loads(real_path.read_text())
    tiny = builder(repository, f"keys-{real_name}")
    assert set(tiny.generation) == set(real["generation"])
    assert tiny.task == real["task"] and tiny.files == real["files"]


def test_repository_reads_the_manifests_back(repository, decoder):
    encoder = build_tiny_encoder(repository)
    for published in (decoder, encoder):
        read = repository.get(published.name)
        assert read == published
        assert repository.verify(read) == ["model.onnx", "tokenizer.json"]
    assert repository.get("tiny-embed").generation["pooling"] == "mean"


def test_builds_are_deterministic(tmp_path, decoder):
    again = build_tiny_decoder(ModelRepository(tmp_path))
    assert again.sha256 == decoder.sha256


def test_corrupt_model_passes_the_manifest_but_not_onnxruntime(repository):
    write_corrupt_model(repository)
    manifest = repository.get("broken-lm")
    assert manifest.task == "text-generation"
    # onnxruntime's InvalidProtobuf has no public import path; match its message instead.
    with pytest.raises(Exception, match="INVALID_PROTOBUF"):
        open_session(manifest)


# ------------------------------------------------------------------------ decoder


def test_kv_cache_decode_equals_full_recompute(session, prompt_ids):
    full, full_present = decoder_forward(session, [prompt_ids])
    split = 10
    logits, past = decoder_forward(session, [prompt_ids[:split]])
    steps = [logits[0]]
    for token in prompt_ids[split:]:
        logits, past = decoder_forward(session, [[token]], past=past)
        steps.append(logits[0])
    np.testing.assert_allclose(np.concatenate(steps), full[0], atol=ATOL)
    for (key, value), (full_key, full_value) in zip(past, full_present, strict=True):
        np.testing.assert_allclose(key, full_key, atol=ATOL)
        np.testing.assert_allclose(value, full_value, atol=ATOL)


def test_logits_depend_only_on_earlier_tokens(session, prompt_ids):
    changed = list(prompt_ids)
    changed[-1] = 40
    a, _ = decoder_forward(session, [prompt_ids])
    b, _ = decoder_forward(session, [changed])
    np.testing.assert_array_equal(a[0, :-1], b[0, :-1])
    assert not np.allclose(a[0, -1], b[0, -1])


def test_right_padded_batch_equals_each_prompt_alone(session, prompt_ids):
    """Prefill two prompts as one right-padded batch, then decode a step for both:
    the pads sit in the middle of the shorter row's cache and must change nothing."""
    short = prompt_ids[:7]
    rows, width = [prompt_ids, short], len(prompt_ids)
    ids = np.zeros((2, width), np.int64)
    mask = np.zeros((2, width), np.int64)
    for row, tokens in enumerate(rows):
        ids[row, : len(tokens)], mask[row, : len(tokens)] = tokens, 1
    logits, past = decoder_forward(session, ids, mask)
    next_tokens = [[int(np.argmax(logits[row, len(tokens) - 1]))] for row, tokens in enumerate(rows)]
    positions = np.array([[len(tokens)] for tokens in rows], np.int64)
    step, _ = decoder_forward(session, next_tokens, np.concatenate([mask, np.ones((2, 1), np.int64)], 1),
                              positions, past)
    for row, tokens in enumerate(rows):
        alone, _ = decoder_forward(session, [tokens + next_tokens[row]])
        np.testing.assert_allclose(logits[row, : len(tokens)], alone[0, :-1], atol=ATOL)
        np.testing.assert_allclose(step[row, 0], alone[0, -1], atol=ATOL)


def test_cached_greedy_loop_matches_the_reference(session, prompt_ids):
    expected = greedy_reference(session, prompt_ids, 12)
    logits, past = decoder_forward(session, [prompt_ids])
    generated, margins = [], []
    for _ in range(12):
        top2 = np.sort(logits[0, -1])[-2:]
        margins.append(top2[1] - top2[0])
        generated.append(int(np.argmax(logits[0, -1])))
        logits, past = decoder_forward(session, [generated[-1:]], past=past)
    assert generated == expected
    assert min(margins) > 1e-3  # greedy choices are far from float-rounding ties


def test_greedy_text_is_readable_and_never_special(session, prompt_ids):
    generated = greedy_reference(session, prompt_ids, 40)
    assert len(generated) == 40 and not {0, IM_START, IM_END} & set(generated)
    text = chat_tokenizer().decode(generated)
    assert text.isascii() and text.strip() and all(c.isprintable() or c == "\n" for c in text)


@pytest.mark.parametrize("k", [0, 1, 3])
def test_eos_after_k_generated_tokens(repository, session, prompt_ids, k):
    eos_model = build_tiny_decoder(repository, f"tiny-eos-{k}", eos_after=k)
    generated = greedy_reference(eos_model, prompt_ids, 10)
    assert generated[-1] == IM_END and len(generated) == k + 1
    # Same seed, same weights: the tokens before EOS are the plain model's.
    assert generated[:-1] == greedy_reference(session, prompt_ids, k)


def test_eos_trick_needs_a_chat_prompt(repository):
    eos_model = build_tiny_decoder(repository, "tiny-eos-raw", eos_after=1)
    raw = chat_tokenizer().encode("Once upon a time").ids
    assert IM_END not in greedy_reference(eos_model, raw, 8)


# ---------------------------------------------------------------------- tokenizer


def test_chatml_round_trip_with_single_id_specials():
    tokenizer = chat_tokenizer()
    prompt = chatml([("user", "Hello, wörld! 😀 the end")])
    encoding = tokenizer.encode(prompt, add_special_tokens=False)
    assert tokenizer.decode(encoding.ids, skip_special_tokens=False) == prompt
    assert [tokenizer.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    assert encoding.ids.count(IM_START) == 3 and encoding.ids.count(IM_END) == 2
    newline, assistant = tokenizer.token_to_id("Ċ"), tokenizer.token_to_id("assistant")
    assert tokenizer.encode("<|im_start|>assistant\n").ids == [IM_START, assistant, newline]
    ascii_ids = tokenizer.encode("Hello the world, yes?").ids
    assert "".join(tokenizer.decode([i]) for i in ascii_ids) == "Hello the world, yes?"


# ------------------------------------------------------------------------ encoder


def unpadded_tokenizer(manifest):
    """The published tokenizer.json with its baked-in fixed padding switched off, as the host does."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(manifest.path_of("tokenizer")))
    assert tokenizer.padding is not None and tokenizer.padding["length"] == 128  # like minilm's
    tokenizer.no_padding()
    assert tokenizer.encode("hello").tokens == ["[CLS]", "hello", "[SEP]"]
    return tokenizer


def test_padded_encoder_batch_equals_unbatched(repository):
    manifest = build_tiny_encoder(repository, "tiny-embed-pad")
    session = open_session(manifest)
    tokenizer = unpadded_tokenizer(manifest)
    texts = ["the cat sat on the mat", "hello"]
    encodings = [tokenizer.encode(t) for t in texts]
    width = max(len(e.ids) for e in encodings)
    ids = np.zeros((2, width), np.int64)
    mask = np.zeros_like(ids)
    for row, encoding in enumerate(encodings):
        ids[row, : len(encoding.ids)], mask[row, : len(encoding.ids)] = encoding.ids, 1
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    batched = session.run(None, feeds)[0]
    assert batched.shape == (2, width, manifest.generation["embedding_dim"])
    for row, encoding in enumerate(encodings):
        one = np.array([encoding.ids], np.int64)
        alone = session.run(None, {"input_ids": one, "attention_mask": np.ones_like(one),
                                   "token_type_ids": np.zeros_like(one)})[0]
        np.testing.assert_allclose(batched[row, : len(encoding.ids)], alone[0], atol=ATOL)
    assert not np.allclose(batched[0, :2], batched[1, :2])  # different texts, different states

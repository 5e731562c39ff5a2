"""The built fleet works with serving dependencies only (onnxruntime, tokenizers,
numpy): no torch, no transformers. Skips unless `mirador fleet build` has run."""

from __future__ import annotations

import numpy as np
import pytest

from services.common.model_repository import ModelNotFoundError, ModelRepository

pytestmark = pytest.mark.real_model

ort = pytest.importorskip("onnxruntime", reason="serving dependency onnxruntime is not installed")
tokenizers = pytest.importorskip("tokenizers", reason="serving dependency tokenizers is not installed")


def built(name: str):
    repository = ModelRepository()
    try:
        return repository.get(name)
    except ModelNotFoundError:
        pytest.skip(f"{name} is not in the model repository {repository.root}; run `mirador fleet build --only {name}`")


def new_session(path) -> "ort.InferenceSession":
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def render_chat(messages: list[dict[str, str]], facts: dict) -> str:
    """ChatML as the manifest describes it (no jinja needed)."""
    markers = facts["chat_markers"]
    if messages[0]["role"] != "system" and facts.get("default_system_prompt"):
        messages = [{"role": "system", "content": facts["default_system_prompt"]}, *messages]
    text = "".join(markers["message"].format(**m) for m in messages)
    return text + markers["generation_prompt"]


def greedy_generate(manifest, prompt: str, max_new_tokens: int = 24, session=None) -> str:
    facts = manifest.generation
    session = session or new_session(manifest.path_of("model"))
    tokenizer = tokenizers.Tokenizer.from_file(str(manifest.path_of("tokenizer")))
    ids = tokenizer.encode(prompt, add_special_tokens=facts["add_special_tokens"]).ids
    cache = facts["past_key_values"]
    empty = np.zeros((1, facts["num_kv_heads"], 0, facts["head_dim"]), dtype=np.float32)
    past = {cache["input_pattern"].format(layer=layer, kind=kind): empty
            for layer in range(facts["num_layers"]) for kind in cache["kinds"]}
    present_to_past = {cache["output_pattern"].format(layer=layer, kind=kind):
                       cache["input_pattern"].format(layer=layer, kind=kind)
                       for layer in range(facts["num_layers"]) for kind in cache["kinds"]}
    output_names = [o.name for o in session.get_outputs()]
    input_names = [i.name for i in session.get_inputs()]

    generated, step_ids, seen = [], ids, 0
    for _ in range(max_new_tokens):
        total = seen + len(step_ids)
        feeds = {
            "input_ids": np.array([step_ids], dtype=np.int64),
            "attention_mask": np.ones((1, total), dtype=np.int64),
            "position_ids": np.arange(seen, total, dtype=np.int64)[None, :],
            **past,
        }
        feeds["logits_to_keep"] = np.array([1], dtype=np.int64)  # the fused graph: the last position only
        feeds = {name: feeds[name] for name in input_names}  # not every export takes position_ids
        outputs = dict(zip(output_names, session.run(output_names, feeds)))
        past = {present_to_past[name]: value for name, value in outputs.items() if name in present_to_past}
        next_id = int(np.argmax(outputs["logits"][0, -1]))
        if next_id in facts["eos_token_ids"]:
            break
        generated.append(next_id)
        seen, step_ids = total, [next_id]
    return tokenizer.decode(generated, skip_special_tokens=True)


def test_smollm2_answers_through_chat_template_with_kv_cache():
    manifest = built("smollm2-135m-instruct")
    facts = manifest.generation
    assert facts["eos_token_ids"] == [2]
    prompt = render_chat([{"role": "user", "content": "What is the capital of France?"}], facts)
    answer = greedy_generate(manifest, prompt)
    assert "Paris" in answer, answer


# Short factual questions with the word a right answer contains (a regular expression, lower case).
FACTUAL = [
    ("What is the capital of France?", r"paris"), ("What is the capital of Japan?", r"tokyo"),
    ("How many days are in a week?", r"seven|7"), ("What color is the sky on a clear day?", r"blue"),
    ("What is the largest planet in our solar system?", r"jupiter"), ("Who wrote Romeo and Juliet?", r"shakespeare"),
    ("What is the boiling point of water in Celsius?", r"100"), ("What is the chemical symbol for gold?", r"\bau\b"),
    ("How many legs does a spider have?", r"eight|8"), ("What is the opposite of hot?", r"cold"),
    ("What language is spoken in Spain?", r"spanish"), ("What is 2 plus 2?", r"four|4"),
    ("What gas do plants absorb from the air?", r"carbon dioxide|co2"),
    ("What is the freezing point of water in Fahrenheit?", r"32"), ("Which ocean is the largest?", r"pacific"),
    ("What is the capital of Italy?", r"rome"),
]


def test_the_default_routes_quantized_model_answers_about_as_well_as_fp32():
    """The shipped config's chat route answers with the per-layer quantized graph and falls back to the
    fp32 graph it was quantized from. Greedy, 32 tokens, on FACTUAL: the quantized one gets at least as
    many right as fp32, less one. Measured when the default became quantized (2026-12-05): fp32 12/16,
    quantized 11/16, the uniform int8 graph 10/16. The one lost is "capital of France", a near-tie in
    fp32 itself (first token 'The' 0.152 against 'L' 0.140): a 135M model's answers are that fragile."""
    import re
    from pathlib import Path

    from services.common.config import load_config

    route = load_config(Path(__file__).resolve().parents[1] / "config" / "mirador.yaml").routes["chat"]
    quantized, fp32 = built(route.primary), built(route.fallback[0])
    assert quantized.extra["quantization"]["source_model"] == fp32.reference
    right = {}
    for manifest in (quantized, fp32):
        session = new_session(manifest.path_of("model"))
        answers = [greedy_generate(manifest, render_chat([{"role": "user", "content": q}], manifest.generation), 32,
                                   session) for q, _ in FACTUAL]
        right[manifest.name] = [q for (q, word), a in zip(FACTUAL, answers) if re.search(word, a.lower())]
    assert len(right[quantized.name]) >= len(right[fp32.name]) - 1, right


def embed(manifest, sentences: list[str]) -> np.ndarray:
    facts = manifest.generation
    session = new_session(manifest.path_of("model"))
    tokenizer = tokenizers.Tokenizer.from_file(str(manifest.path_of("tokenizer")))
    tokenizer.enable_truncation(facts["max_length"])
    tokenizer.enable_padding()
    encodings = tokenizer.encode_batch(sentences)
    ids = np.array([e.ids for e in encodings], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    feeds = {name: feeds[name] for name in facts["input_names"]}
    hidden = session.run([facts["hidden_output"]], feeds)[0]
    assert facts["pooling"] == "mean"
    pooled = (hidden * mask[..., None]).sum(axis=1) / mask.sum(axis=1, keepdims=True)
    if facts["normalize"]:
        pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
    return pooled


def test_minilm_embeddings_rank_related_sentences_higher():
    manifest = built("minilm-l6")
    vectors = embed(manifest, [
        "A man is playing a guitar.",
        "Someone is playing a musical instrument.",
        "The central bank raised interest rates again.",
    ])
    assert vectors.shape == (3, manifest.generation["embedding_dim"])
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    related, unrelated = float(vectors[0] @ vectors[1]), float(vectors[0] @ vectors[2])
    assert related > 0.5, related
    assert related > unrelated + 0.3, (related, unrelated)


@pytest.mark.xfail(reason="the GGUF-converted Gemma 3 tokenizer splits words into non-canonical pieces "
                          "('capital' -> '▁c','ap','it','al'), which degrades completions", strict=False)
def test_gemma3_base_model_completes_a_plain_prompt():
    manifest = built("gemma3-270m")  # optional: `mirador fleet build --with-gemma`
    completion = greedy_generate(manifest, "The capital of France is", max_new_tokens=8)
    assert "Paris" in completion, completion


def test_route_features_read_a_request_framed_as_a_user_turn_and_its_markers_as_text():
    """smollm2-135m-features: SmolLM2's first layers as an encoder. The tokenizer frames the
    text as the chat's user turn; markers written in the text stay text; the pooled hidden
    states of a text do not depend on what it is batched with (padding is masked)."""
    from services.model_host.loader import SessionSettings, load_runtime

    manifest = built("smollm2-135m-features")
    runtime = load_runtime(manifest, SessionSettings(intra_op_threads=2))
    chat = built("smollm2-135m-instruct")
    plain = tokenizers.Tokenizer.from_file(str(chat.directory / chat.files["tokenizer"]))
    prefix, suffix = (plain.encode(part, add_special_tokens=False).ids for part in manifest.generation["frame"])
    ids = runtime.tokenizer.encode("write a query <|im_end|> now").ids
    assert ids[:len(prefix)] == prefix and ids[-len(suffix):] == suffix
    inner = ids[len(prefix):-len(suffix)]
    end_id = plain.token_to_id("<|im_end|>")
    assert end_id not in inner and len(inner) > 4  # `<|im_end|>` in the text is read as its characters
    alone = runtime.embed(["extract the member id"])
    batched = runtime.embed(["extract the member id", "a much longer request that pads the first one in the batch"])
    assert alone.shape == (1, manifest.generation["embedding_dim"])
    np.testing.assert_allclose(batched[0], alone[0], rtol=1e-4, atol=1e-4)
    assert not np.allclose(batched[1], alone[0], atol=1e-2)

"""Tiny but real ONNX models, written into a ModelRepository the way `mirador fleet build` does.

Each builder runs in milliseconds and produces the same interface as the real exports
(optimum's ``text-generation-with-past`` decoder and ``feature-extraction`` encoder):
same input/output names, dtypes, dynamic axes, KV-cache layout and manifest keys.

* `build_tiny_decoder`: a causal LM with a KV cache. Byte-level BPE tokenizer with the
  ChatML specials at SmolLM2's ids: 0 ``<|endoftext|>``, 1 ``<|im_start|>`` (bos),
  2 ``<|im_end|>`` (eos). The model never emits special tokens or non-printable bytes on
  its own, so greedy text is readable ASCII; with ``eos_after=k`` it emits ``<|im_end|>``
  once k tokens follow the last ``<|im_start|>assistant\\n``.
* `build_tiny_encoder`: a BERT-like sentence encoder (WordPiece, [CLS]/[SEP], and the
  same baked-in fixed padding/truncation to 128 that the real minilm tokenizer.json has).
* `write_corrupt_model`: a valid manifest whose model.onnx is garbage.
* `decoder_forward` / `greedy_reference`: run a decoder directly, for expected outputs.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from services.common.model_repository import ModelManifest, ModelRepository

OPSET = 18  # what the real exports use
IR_VERSION = 8
NEG = -1e9  # finite "minus infinity": a fully masked row gives a uniform softmax, never NaN

ENDOFTEXT, IM_START, IM_END = 0, 1, 2
CHAT_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SYSTEM_PROMPT = "You are a helpful AI assistant"
# Whole-word tokens on top of the 256 byte tokens ("Ġ" is a leading space in byte-level BPE).
# The role names must be single tokens: the EOS trick counts "<|im_start|>assistant\n" as 3.
MERGED_WORDS = ["assistant", "user", "system", "Ġthe", "Ġyes", "Ġno", "Ġhello", "Ġworld"]
GENERATION_PROMPT_TOKENS = 3
EOS_NEVER = 1 << 30


# ------------------------------------------------------------------- graph building


class _Graph:
    """A thin wrapper over onnx.helper: nodes get unique output names, constants become initializers."""

    def __init__(self, name: str):
        self.name, self.nodes, self.inits, self._count = name, [], [], 0

    def _fresh(self, op: str) -> str:
        self._count += 1
        return f"{op.lower()}_{self._count}"

    def const(self, value, dtype=np.float32) -> str:
        name = self._fresh("c")
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def ints(self, *values: int) -> str:
        return self.const(list(values), np.int64)

    def op(self, op: str, *inputs: str, out: str | None = None, **attrs) -> str:
        out = out or self._fresh(op)
        self.nodes.append(helper.make_node(op, list(inputs), [out], **attrs))
        return out

    def save(self, path: Path, inputs, outputs) -> None:
        graph = helper.make_graph(self.nodes, self.name, inputs, outputs, initializer=self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = IR_VERSION
        onnx.checker.check_model(model, full_check=True)
        onnx.save(model, str(path))

    # Composite pieces shared by both models.

    def dim(self, tensor: str, axis: int) -> str:
        """Size of one axis as an int64 scalar."""
        return self.op("Squeeze", self.op("Shape", tensor, start=axis, end=axis + 1), self.ints(0))

    def layer_norm(self, x: str, width: int) -> str:
        scale, bias = self.const(np.ones(width)), self.const(np.zeros(width))
        return self.op("LayerNormalization", x, scale, bias, axis=-1)

    def split_heads(self, x: str, heads: int, head_dim: int) -> str:
        """[B, S, heads*head_dim] -> [B, heads, S, head_dim]."""
        x = self.op("Reshape", x, self.ints(0, 0, heads, head_dim))
        return self.op("Transpose", x, perm=[0, 2, 1, 3])

    def attention(self, q: str, k: str, v: str, additive_mask: str, head_dim: int, width: int) -> str:
        """softmax(q k^T / sqrt(d) + mask) v, heads merged back to [B, S, width]."""
        scores = self.op("MatMul", q, self.op("Transpose", k, perm=[0, 1, 3, 2]))
        scores = self.op("Add", self.op("Mul", scores, self.const(1 / math.sqrt(head_dim))), additive_mask)
        out = self.op("MatMul", self.op("Softmax", scores, axis=-1), v)
        out = self.op("Transpose", out, perm=[0, 2, 1, 3])
        return self.op("Reshape", out, self.ints(0, 0, width))

    def mlp(self, x: str, rng: np.random.Generator, width: int) -> str:
        hidden = self.op("Tanh", self.op("MatMul", x, self.const(_weights(rng, width, 4 * width))))
        return self.op("MatMul", hidden, self.const(_weights(rng, 4 * width, width)))


def _weights(rng: np.random.Generator, rows: int, cols: int, gain: float = 1.0) -> np.ndarray:
    return (rng.standard_normal((rows, cols)) * gain / math.sqrt(rows)).astype(np.float32)


def _int_input(name: str, dims: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.INT64, dims)


def _float_value(name: str, dims: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


# ------------------------------------------------------------------------ tokenizers


def chat_tokenizer() -> Tokenizer:
    """Byte-level BPE like SmolLM2's: every string encodes (no UNK), specials are single ids."""
    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet(), key=_BYTE_OF.__getitem__)
    vocab = {token: i for i, token in enumerate(CHAT_SPECIALS + byte_chars)}
    merges: list[tuple[str, str]] = []
    for word in MERGED_WORDS:  # each word as a chain of prefix merges: a+b, ab+c, ...
        for end in range(2, len(word) + 1):
            pair = (word[: end - 1], word[end - 1])
            if word[:end] not in vocab:
                vocab[word[:end]] = len(vocab)
                merges.append(pair)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CHAT_SPECIALS])
    return tokenizer


def _bytes_to_unicode() -> dict[str, int]:
    """GPT-2's byte <-> character table, inverted: ByteLevel alphabet character -> byte."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


_BYTE_OF = _bytes_to_unicode()


def readable_token_mask(tokenizer: Tokenizer) -> np.ndarray:
    """True for tokens the decoder may emit: printable ASCII bytes, newline and merged words."""
    allowed = np.zeros(tokenizer.get_vocab_size(), dtype=bool)
    for token, index in tokenizer.get_vocab().items():
        if token in CHAT_SPECIALS:
            continue
        raw = bytes(_BYTE_OF[c] for c in token)
        allowed[index] = all(32 <= b < 127 or b == 10 for b in raw)
    return allowed


def embedding_tokenizer(max_length: int = 128) -> Tokenizer:
    """WordPiece like all-MiniLM-L6-v2's, including its baked-in fixed padding and truncation."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-:;()\"")
    words = ["the", "a", "is", "cat", "dog", "sat", "on", "mat", "hello", "world", "model", "embedding"]
    vocab_list = specials + words + chars + ["##" + c for c in chars]
    tokenizer = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab_list)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tokenizer.enable_truncation(max_length)
    tokenizer.enable_padding(length=max_length, pad_id=0, pad_token="[PAD]")
    return tokenizer


# -------------------------------------------------------------------------- decoder


def _write_decoder_onnx(
    path: Path, *, vocab: int, num_layers: int, kv_heads: int, head_dim: int, max_positions: int,
    seed: int, eos_after: int | None, emittable: np.ndarray,
) -> None:
    """Embedding (+ learned absolute positions) -> pre-norm attention/MLP blocks -> logits.

    Causality is by cache index (key j is visible to query i iff j <= past+i) and padding
    by attention_mask, exactly as in HF's llama; positions come only from position_ids, so
    masked pads anywhere in the cache change nothing.

    EOS trick: channel (head 0, dim 0) of layer 0's *value* cache holds a marker, the
    token's position if it is <|im_start|>, else -1 (its Wo row is zero, so it never feeds
    the residual stream). ReduceMax over visible keys gives the last <|im_start|> position s;
    the query at position p then forces EOS when s >= 0 and p - s >= eos_after + 2.
    """
    rng = np.random.default_rng(seed)
    width = kv_heads * head_dim
    g = _Graph("tiny_decoder")
    seq = ["batch_size", "sequence_length"]
    total = ["batch_size", "past_sequence_length + sequence_length"]
    inputs = [_int_input("input_ids", seq), _int_input("attention_mask", total)]
    inputs.append(_int_input("position_ids", seq))
    outputs = [_float_value("logits", [*seq, vocab])]

    x = g.op(
        "Add",
        g.op("Gather", g.const(rng.standard_normal((vocab, width))), "input_ids"),
        g.op("Gather", g.const(rng.standard_normal((max_positions, width))), "position_ids"),
    )
    # allowed[b, 0, i, j]: key j visible to query i. Shared by every layer.
    total_len = g.dim("attention_mask", 1)
    past_len = g.op("Sub", total_len, g.dim("input_ids", 1))
    zero, one = g.const(0, np.int64), g.const(1, np.int64)
    query_index = g.op("Unsqueeze", g.op("Range", past_len, total_len, one), g.ints(1))
    key_index = g.op("Unsqueeze", g.op("Range", zero, total_len, one), g.ints(0))
    causal = g.op("LessOrEqual", key_index, query_index)  # [S, T]
    key_visible = g.op("Unsqueeze", g.op("Cast", "attention_mask", to=TensorProto.BOOL), g.ints(1, 2))
    allowed = g.op("And", causal, key_visible)  # [B, 1, S, T]
    additive = g.op("Where", allowed, g.const(0.0), g.const(NEG))

    marker_channel = np.zeros((1, kv_heads, 1, head_dim), np.float32)
    marker_channel[0, 0, 0, 0] = 1
    positions = g.op("Cast", "position_ids", to=TensorProto.FLOAT)
    marker = g.op("Where", g.op("Equal", "input_ids", g.const(IM_START, np.int64)), positions, g.const(-1.0))
    marker = g.op("Unsqueeze", marker, g.ints(1, 3))  # [B, 1, S, 1]

    for layer in range(num_layers):
        past_k, past_v = f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"
        present_k, present_v = f"present.{layer}.key", f"present.{layer}.value"
        cache = ["batch_size", kv_heads, "past_sequence_length", head_dim]
        inputs += [_float_value(past_k, cache), _float_value(past_v, cache)]
        grown = ["batch_size", kv_heads, "past_sequence_length + sequence_length", head_dim]
        outputs += [_float_value(present_k, grown), _float_value(present_v, grown)]

        h = g.layer_norm(x, width)
        q, k, v = (g.split_heads(g.op("MatMul", h, g.const(_weights(rng, width, width))), kv_heads, head_dim)
                   for _ in range(3))
        w_out = _weights(rng, width, width)
        if layer == 0:  # write the EOS marker into its value channel, and keep it out of the residual
            kept = g.op("Mul", v, g.const(1 - marker_channel))
            v = g.op("Add", kept, g.op("Mul", marker, g.const(marker_channel)))
            w_out[0, :] = 0
        keys = g.op("Concat", past_k, k, axis=2, out=present_k)
        values = g.op("Concat", past_v, v, axis=2, out=present_v)
        attended = g.attention(q, keys, values, additive, head_dim, width)
        x = g.op("Add", x, g.op("MatMul", attended, g.const(w_out)))
        x = g.op("Add", x, g.mlp(g.layer_norm(x, width), rng, width))
        if layer == 0:
            markers = g.op("Slice", values, g.ints(0, 0), g.ints(1, 1), g.ints(1, 3))  # [B, 1, T, 1]
            markers = g.op("Transpose", markers, perm=[0, 1, 3, 2])  # [B, 1, 1, T]
            last_start = g.op("ReduceMax", g.op("Where", allowed, markers, g.const(-1.0)),
                              g.ints(1, 3), keepdims=0)  # [B, S]

    # Big-gain head: wide logit gaps keep greedy choices far from float-rounding ties.
    logits = g.op("MatMul", g.layer_norm(x, width), g.const(_weights(rng, width, vocab, gain=4.0)))
    # Never emit specials or unreadable bytes on its own.
    logits = g.op("Add", logits, g.const(np.where(emittable, 0.0, -1e3)))
    # With "<|im_start|>assistant\n" at s, s+1, s+2, the query at p follows p - s - 2 generated tokens.
    threshold = g.const((EOS_NEVER if eos_after is None else eos_after) + GENERATION_PROMPT_TOKENS - 1)
    trigger = g.op(
        "And",
        g.op("GreaterOrEqual", last_start, g.const(0.0)),
        g.op("GreaterOrEqual", g.op("Sub", positions, last_start), threshold),
    )
    eos_boost = np.zeros(vocab, np.float32)
    eos_boost[IM_END] = 2e3
    trigger = g.op("Unsqueeze", g.op("Cast", trigger, to=TensorProto.FLOAT), g.ints(2))
    g.op("Add", logits, g.op("Mul", trigger, g.const(eos_boost)), out="logits")
    g.save(path, inputs, outputs)


def _chat_generation(*, num_layers: int, heads: int, kv_heads: int, head_dim: int, vocab: int,
                     max_positions: int, **overrides) -> dict:
    """The manifest's `generation` facts of a tiny ChatML decoder (what the real builds write)."""
    return {
        "input_names": ["input_ids", "attention_mask", "position_ids"],
        "output_names": ["logits"],
        "past_key_values": {"input_pattern": "past_key_values.{layer}.{kind}",
                            "output_pattern": "present.{layer}.{kind}", "kinds": ["key", "value"],
                            "num_layers": num_layers, "layout": ["batch", "num_kv_heads", "sequence", "head_dim"]},
        "num_layers": num_layers,
        "num_attention_heads": heads,
        "num_kv_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_size": heads * head_dim,
        "vocab_size": vocab,
        "max_position_embeddings": max_positions,
        "bos_token_id": IM_START,
        "pad_token_id": None,
        "eos_token_ids": [IM_END],
        "chat_template": (
            "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
            "{{ '<|im_start|>system\\n" + SYSTEM_PROMPT + "<|im_end|>\\n' }}{% endif %}"
            "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
        ),
        "dtype": "float32",
        "chat_format": "chatml",
        "chat_markers": {"message": "<|im_start|>{role}\n{content}<|im_end|>\n",
                         "generation_prompt": "<|im_start|>assistant\n"},
        "default_system_prompt": SYSTEM_PROMPT,
        "add_special_tokens": False,
        "stop_tokens": ["<|im_end|>"],
        **overrides,
    }


def build_tiny_decoder(
    repository: ModelRepository,
    name: str = "tiny-lm",
    version: str = "1",
    *,
    num_layers: int = 2,
    kv_heads: int = 1,
    head_dim: int = 8,
    max_positions: int = 2048,
    seed: int = 0,
    eos_after: int | None = None,
    replace: bool = False,
) -> ModelManifest:
    """Publish a tiny ChatML decoder; returns the published manifest (with `.directory`)."""
    tokenizer = chat_tokenizer()
    vocab = tokenizer.get_vocab_size()
    generation = _chat_generation(num_layers=num_layers, heads=kv_heads, kv_heads=kv_heads, head_dim=head_dim,
                                  vocab=vocab, max_positions=max_positions)  # no grouped-query sharing here

    def build(folder: Path) -> ModelManifest:
        _write_decoder_onnx(
            folder / "model.onnx", vocab=vocab, num_layers=num_layers, kv_heads=kv_heads, head_dim=head_dim,
            max_positions=max_positions, seed=seed, eos_after=eos_after,
            emittable=readable_token_mask(tokenizer),
        )
        tokenizer.save(str(folder / "tokenizer.json"))
        return ModelManifest(
            name=name, version=version, task="text-generation", architecture="llama",
            files={"model": "model.onnx", "tokenizer": "tokenizer.json"},
            source={"kind": "test", "builder": "tests/tiny_models.py"}, licence="Apache-2.0",
            generation=generation,
            extra={"export_task": "text-generation-with-past", "seed": seed, "eos_after": eos_after},
        )

    return repository.write_version(name, version, build, replace=replace)


# -------------------------------------------------------------------------- encoder


def _write_encoder_onnx(path: Path, *, vocab: int, hidden: int, heads: int, num_layers: int,
                        max_positions: int, seed: int) -> None:
    """BERT-like: token + position + type embeddings, bidirectional blocks, last_hidden_state.

    Pads are masked as keys, so real positions never see them (right padding is batch-invariant)."""
    rng = np.random.default_rng(seed)
    head_dim = hidden // heads
    g = _Graph("tiny_encoder")
    seq = ["batch_size", "sequence_length"]
    positions = g.op("Range", g.const(0, np.int64), g.dim("input_ids", 1), g.const(1, np.int64))
    positions = g.op("Unsqueeze", positions, g.ints(0))
    x = g.op("Add", g.op("Gather", g.const(rng.standard_normal((vocab, hidden))), "input_ids"),
             g.op("Gather", g.const(rng.standard_normal((max_positions, hidden))), positions))
    x = g.op("Add", x, g.op("Gather", g.const(rng.standard_normal((2, hidden))), "token_type_ids"))
    x = g.layer_norm(x, hidden)
    key_visible = g.op("Unsqueeze", g.op("Cast", "attention_mask", to=TensorProto.BOOL), g.ints(1, 2))
    additive = g.op("Where", key_visible, g.const(0.0), g.const(NEG))  # [B, 1, 1, S]
    for _ in range(num_layers):  # post-norm, as in BERT
        q, k, v = (g.split_heads(g.op("MatMul", x, g.const(_weights(rng, hidden, hidden))), heads, head_dim)
                   for _ in range(3))
        attended = g.attention(q, k, v, additive, head_dim, hidden)
        attended = g.op("MatMul", attended, g.const(_weights(rng, hidden, hidden)))
        x = g.layer_norm(g.op("Add", x, attended), hidden)
        x = g.layer_norm(g.op("Add", x, g.mlp(x, rng, hidden)), hidden)
    g.op("Identity", x, out="last_hidden_state")
    inputs = [_int_input(n, seq) for n in ("input_ids", "attention_mask", "token_type_ids")]
    g.save(path, inputs, [_float_value("last_hidden_state", [*seq, hidden])])


def build_tiny_encoder(
    repository: ModelRepository,
    name: str = "tiny-embed",
    version: str = "1",
    *,
    hidden: int = 32,
    heads: int = 4,
    num_layers: int = 1,
    max_length: int = 128,
    seed: int = 0,
    replace: bool = False,
) -> ModelManifest:
    """Publish a tiny sentence encoder (mean pooling, normalised); returns the published manifest."""
    tokenizer = embedding_tokenizer(max_length)
    generation = {
        "input_names": ["input_ids", "attention_mask", "token_type_ids"],
        "output_names": ["last_hidden_state"],
        "pooling": "mean",
        "normalize": True,
        "max_length": max_length,
        "embedding_dim": hidden,
        "hidden_output": "last_hidden_state",
    }

    def build(folder: Path) -> ModelManifest:
        _write_encoder_onnx(
            folder / "model.onnx", vocab=tokenizer.get_vocab_size(), hidden=hidden, heads=heads,
            num_layers=num_layers, max_positions=max(max_length, 512), seed=seed,
        )
        tokenizer.save(str(folder / "tokenizer.json"))
        return ModelManifest(
            name=name, version=version, task="embedding", architecture="bert",
            files={"model": "model.onnx", "tokenizer": "tokenizer.json"},
            source={"kind": "test", "builder": "tests/tiny_models.py"}, licence="MIT",
            generation=generation, extra={"export_task": "feature-extraction", "seed": seed},
        )

    return repository.write_version(name, version, build, replace=replace)


# --------------------------------------------------------------------- broken model


def write_corrupt_model(
    repository: ModelRepository, name: str = "broken-lm", version: str = "1"
) -> ModelManifest:
    """A decoder whose manifest and tokenizer are fine but whose model.onnx is not ONNX."""

    def build(folder: Path) -> ModelManifest:
        (folder / "model.onnx").write_bytes(b"this is not an onnx model\x00\xff" * 8)
        chat_tokenizer().save(str(folder / "tokenizer.json"))
        return ModelManifest(
            name=name, version=version, task="text-generation", architecture="llama",
            files={"model": "model.onnx", "tokenizer": "tokenizer.json"},
            source={"kind": "test", "builder": "tests/tiny_models.py"},
            generation={
                "input_names": ["input_ids", "attention_mask", "position_ids"],
                "output_names": ["logits"],
                "eos_token_ids": [IM_END],
                "chat_format": "chatml",
            },
        )

    return repository.write_version(name, version, build)


# ------------------------------------------------------------------ reference runs


def open_session(manifest_or_path: ModelManifest | str | Path) -> ort.InferenceSession:
    path = manifest_or_path
    if isinstance(manifest_or_path, ModelManifest):
        path = manifest_or_path.path_of("model")
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def decoder_forward(
    session: ort.InferenceSession,
    input_ids: np.ndarray | Sequence[Sequence[int]],
    attention_mask: np.ndarray | None = None,
    position_ids: np.ndarray | None = None,
    past: list[tuple[np.ndarray, np.ndarray]] | None = None,
) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """One run of a decoder. Defaults: mask all ones, positions continuing after the past,
    empty past. Returns logits [B, S, V] and the present (key, value) per layer."""
    input_ids = np.asarray(input_ids, dtype=np.int64)
    batch, steps = input_ids.shape
    cache_inputs = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    if past is None:
        kv_heads, head_dim = cache_inputs[0].shape[1], cache_inputs[0].shape[3]
        empty = np.zeros((batch, kv_heads, 0, head_dim), np.float32)
        past = [(empty, empty)] * (len(cache_inputs) // 2)
    past_len = past[0][0].shape[2]
    if attention_mask is None:
        attention_mask = np.ones((batch, past_len + steps), np.int64)
    if position_ids is None:
        position_ids = np.broadcast_to(np.arange(past_len, past_len + steps, dtype=np.int64), (batch, steps))
    feeds = {"input_ids": input_ids, "attention_mask": np.asarray(attention_mask, np.int64),
             "position_ids": np.ascontiguousarray(position_ids, np.int64)}
    for layer, (key, value) in enumerate(past):
        feeds[f"past_key_values.{layer}.key"], feeds[f"past_key_values.{layer}.value"] = key, value
    names = ["logits"] + [f"present.{layer}.{kind}" for layer in range(len(past))
                          for kind in ("key", "value")]
    logits, *presents = session.run(names, feeds)
    return logits, list(zip(presents[0::2], presents[1::2], strict=True))


def greedy_reference(
    manifest_or_session: ModelManifest | ort.InferenceSession,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    *,
    stop_at_eos: bool = True,
) -> list[int]:
    """Greedy continuation, recomputing the full sequence every step (no KV cache), so it
    is independent of any caching logic under test. Includes the EOS id if one is emitted."""
    session = manifest_or_session if isinstance(manifest_or_session, ort.InferenceSession) \
        else open_session(manifest_or_session)
    tokens, generated = list(prompt_ids), []
    for _ in range(max_new_tokens):
        logits, _ = decoder_forward(session, [tokens])
        token = int(np.argmax(logits[0, -1]))
        generated.append(token)
        tokens.append(token)
        if stop_at_eos and token == IM_END:
            break
    return generated


def chatml(messages: Sequence[tuple[str, str]], system: str | None = SYSTEM_PROMPT) -> str:
    """The ChatML prompt the manifest describes, with the generation prompt; for expected ids."""
    if system is not None and (not messages or messages[0][0] != "system"):
        messages = [("system", system), *messages]
    return "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in messages) + \
        "<|im_start|>assistant\n"


# -------------------------------------------------------------------------- fused decoder


def build_tiny_fused_decoder(
    repository: ModelRepository,
    name: str = "tiny-fused-lm",
    version: str = "1",
    *,
    num_layers: int = 2,
    max_positions: int = 256,
    seed: int = 0,
    replace: bool = False,
    dtype: str = "float32",
) -> ModelManifest:
    """A tiny random llama written by Mirador's own fused-graph builder (GroupQueryAttention,
    shared-buffer KV cache, `logits_to_keep`), with the ChatML tokenizer: the graph the model
    host's batched engine runs. Its greedy text is random but deterministic. `dtype` float16:
    the GPU variant (float16 weights, KV cache and logits), converted as the fleet converts it."""
    from services.fleet.fused_versions import to_float16
    from services.fleet.gguf_weights import LlamaHParams
    from services.fleet.llama_graph import GRAPH_FORMAT, build_llama_model, save_model

    tokenizer = chat_tokenizer()
    vocab = tokenizer.get_vocab_size()
    hp = LlamaHParams(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_layers=num_layers, num_heads=4,
                      num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
                      max_position_embeddings=max_positions)
    rng = np.random.default_rng(seed)
    d, f = hp.hidden_size, hp.intermediate_size
    weights = {"token_embd.weight": rng.normal(0, 0.5, (vocab, d)).astype(np.float32),
               "output_norm.weight": np.ones(d, np.float32)}
    for i in range(num_layers):
        w = lambda *shape: rng.normal(0, 0.15, shape).astype(np.float32)  # noqa: E731
        p = f"blk.{i}"
        weights.update({
            f"{p}.attn_q.weight": w(hp.q_size, d), f"{p}.attn_k.weight": w(hp.kv_size, d),
            f"{p}.attn_v.weight": w(hp.kv_size, d), f"{p}.attn_output.weight": w(d, hp.q_size),
            f"{p}.ffn_gate.weight": w(f, d), f"{p}.ffn_up.weight": w(f, d), f"{p}.ffn_down.weight": w(d, f),
            f"{p}.attn_norm.weight": np.ones(d, np.float32), f"{p}.ffn_norm.weight": np.ones(d, np.float32),
        })
    generation = _chat_generation(
        num_layers=num_layers, heads=hp.num_heads, kv_heads=hp.num_kv_heads, head_dim=hp.head_dim, vocab=vocab,
        max_positions=max_positions, input_names=["input_ids", "attention_mask", "logits_to_keep"],
        batched_continuation=False, kv_cache="shared-buffer")
    generation["dtype"] = dtype

    def build(folder: Path) -> ModelManifest:
        model = build_llama_model(hp, weights, 32, unpermute_qk=False)
        save_model(to_float16(model) if dtype == "float16" else model, folder / "model.onnx")
        tokenizer.save(str(folder / "tokenizer.json"))
        return ModelManifest(
            name=name, version=version, task="text-generation", architecture="llama",
            files={"model": "model.onnx", "tokenizer": "tokenizer.json"},
            source={"kind": "test", "builder": "tests/tiny_models.py"}, licence="Apache-2.0",
            generation=generation, extra={"graph_format": GRAPH_FORMAT, "seed": seed},
        )

    return repository.write_version(name, version, build, replace=replace)

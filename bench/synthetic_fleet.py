"""Synthetic models for bench/fleet_scale.py: random weights in real architectures, at the sizes of
real small models, so that a fleet of 78 can be loaded, served and evicted like a real one.

- Encoders: BERT (word, position and type embeddings; post-norm blocks with biases and erf GELU;
  `last_hidden_state`), at the shapes of BERT-tiny / -mini / -small / -medium and MiniLM-L12-H384,
  with minilm-l6's WordPiece tokenizer (vocabulary 30,522, as BERT's). Served by Embed.
- Decoders: llama, written by Mirador's own fused-graph builder (services/fleet/llama_graph.py:
  GroupQueryAttention, shared-buffer KV cache, tied embeddings) at three SmolLM-like shapes, with
  SmolLM2's tokenizer and chat template (vocabulary 49,152). Served by Generate (Ask naming them).

Every model is fp32, at most ~200 MB on disk, named `synthetic-…`, and written once into
`<root>/models` (a model repository outside the git tree, default ~/.cache/mirador/fleet-scale),
next to links to the real fleet's models, so one repository holds the whole fleet. Each model's
optimised graph is written into the model host's cache when it is built, as a host that has
served it before would have it: cold loads then measure loading, not the one-off optimisation.

    python bench/synthetic_fleet.py [--root DIR]     # build what is missing; prints the sizes
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import numpy as np  # noqa: E402
from onnx import TensorProto  # noqa: E402

from services.common.model_repository import ModelManifest, ModelRepository, default_repository_root  # noqa: E402

DEFAULT_ROOT = Path.home() / ".cache" / "mirador" / "fleet-scale"
ENCODER_TOKENIZER_FROM = "minilm-l6"
DECODER_TOKENIZER_FROM = "smollm2-135m-instruct-fused"
BERT_VOCAB, LLAMA_VOCAB = 30522, 49152


@dataclass(frozen=True)
class Shape:
    arch: str        # "bert" or "llama"
    label: str       # the shape's name in model names
    hidden: int
    layers: int
    inner: int       # feed-forward width
    heads: int
    kv_heads: int = 0  # llama only (grouped-query attention)
    count: int = 1     # models of this shape in the fleet

    @property
    def params(self) -> int:
        h, f = self.hidden, self.inner
        if self.arch == "bert":
            return (BERT_VOCAB + 512 + 2) * h + self.layers * (4 * h * h + 2 * h * f + 9 * h + f)
        head = h // self.heads
        kv = self.kv_heads * head
        return LLAMA_VOCAB * h + self.layers * (2 * h * h + 2 * h * kv + 3 * h * f + 2 * h)

    @property
    def megabytes(self) -> float:
        return self.params * 4 / 2**20


# More small models than large ones, as in a fleet of specialists. 73 models, ~6.6 GB of files.
SHAPES = [
    Shape("bert", "bert-tiny", 128, 2, 512, 2, count=10),         # ~18 MB
    Shape("bert", "bert-mini", 256, 4, 1024, 4, count=14),        # ~44 MB
    Shape("bert", "bert-small", 512, 4, 2048, 8, count=10),       # ~111 MB
    Shape("bert", "minilm-l12", 384, 12, 1536, 12, count=8),      # ~127 MB
    Shape("bert", "bert-medium", 512, 8, 2048, 8, count=6),       # ~159 MB
    Shape("llama", "llama-h256", 256, 4, 768, 4, kv_heads=2, count=10),   # ~60 MB
    Shape("llama", "llama-h384", 384, 6, 1024, 6, kv_heads=2, count=9),   # ~107 MB
    Shape("llama", "llama-h512", 512, 8, 1408, 8, kv_heads=2, count=6),   # ~182 MB
]


def planned() -> list[tuple[str, Shape, int]]:
    """(name, shape, seed) of every synthetic model, in a fixed order."""
    out, seed = [], 1000
    for shape in SHAPES:
        for index in range(shape.count):
            out.append((f"synthetic-{shape.label}-{index + 1:02d}", shape, seed))
            seed += 1
    return out


def _normal(rng: np.random.Generator, shape, scale: float) -> np.ndarray:
    values = rng.standard_normal(shape, dtype=np.float32)
    values *= scale
    return values


# ------------------------------------------------------------------------ BERT


def write_bert(path: Path, shape: Shape, seed: int) -> None:
    from tiny_models import _float_value, _Graph, _int_input

    rng = np.random.default_rng(seed)
    h, f, heads = shape.hidden, shape.inner, shape.heads
    head_dim = h // heads
    g = _Graph(f"synthetic_{shape.label}")

    def dense(x: str, rows: int, cols: int) -> str:
        return g.op("Add", g.op("MatMul", x, g.const(_normal(rng, (rows, cols), 1 / math.sqrt(rows)))),
                    g.const(np.zeros(cols, np.float32)))

    positions = g.op("Unsqueeze", g.op("Range", g.const(0, np.int64), g.dim("input_ids", 1), g.const(1, np.int64)),
                     g.ints(0))
    x = g.op("Add", g.op("Gather", g.const(_normal(rng, (BERT_VOCAB, h), 0.02)), "input_ids"),
             g.op("Gather", g.const(_normal(rng, (512, h), 0.02)), positions))
    x = g.layer_norm(g.op("Add", x, g.op("Gather", g.const(_normal(rng, (2, h), 0.02)), "token_type_ids")), h)
    visible = g.op("Unsqueeze", g.op("Cast", "attention_mask", to=TensorProto.BOOL), g.ints(1, 2))
    additive = g.op("Where", visible, g.const(0.0), g.const(-1e9))
    for _ in range(shape.layers):
        q, k, v = (g.split_heads(dense(x, h, h), heads, head_dim) for _ in range(3))
        attended = dense(g.attention(q, k, v, additive, head_dim, h), h, h)
        x = g.layer_norm(g.op("Add", x, attended), h)
        inner = dense(x, h, f)  # GELU, erf form (BERT's)
        gelu = g.op("Mul", g.op("Mul", inner, g.const(0.5)),
                    g.op("Add", g.const(1.0), g.op("Erf", g.op("Mul", inner, g.const(1 / math.sqrt(2))))))
        x = g.layer_norm(g.op("Add", x, dense(gelu, f, h)), h)
    g.op("Identity", x, out="last_hidden_state")
    seq = ["batch_size", "sequence_length"]
    g.save(path, [_int_input(n, seq) for n in ("input_ids", "attention_mask", "token_type_ids")],
           [_float_value("last_hidden_state", [*seq, h])])


# ------------------------------------------------------------------------ llama


def write_llama(path: Path, shape: Shape, seed: int) -> None:
    from services.fleet.gguf_weights import LlamaHParams
    from services.fleet.llama_graph import build_llama_model, save_model

    head_dim = shape.hidden // shape.heads
    hp = LlamaHParams(vocab_size=LLAMA_VOCAB, hidden_size=shape.hidden, intermediate_size=shape.inner,
                      num_layers=shape.layers, num_heads=shape.heads, num_kv_heads=shape.kv_heads, head_dim=head_dim,
                      rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=2048)
    rng = np.random.default_rng(seed)
    d, f, q, kv = hp.hidden_size, hp.intermediate_size, hp.q_size, hp.kv_size
    weights = {"token_embd.weight": _normal(rng, (LLAMA_VOCAB, d), 0.02), "output_norm.weight": np.ones(d, np.float32)}
    for i in range(hp.num_layers):
        p = f"blk.{i}"
        weights.update({
            f"{p}.attn_q.weight": _normal(rng, (q, d), 1 / math.sqrt(d)),
            f"{p}.attn_k.weight": _normal(rng, (kv, d), 1 / math.sqrt(d)),
            f"{p}.attn_v.weight": _normal(rng, (kv, d), 1 / math.sqrt(d)),
            f"{p}.attn_output.weight": _normal(rng, (d, q), 1 / math.sqrt(q)),
            f"{p}.ffn_gate.weight": _normal(rng, (f, d), 1 / math.sqrt(d)),
            f"{p}.ffn_up.weight": _normal(rng, (f, d), 1 / math.sqrt(d)),
            f"{p}.ffn_down.weight": _normal(rng, (d, f), 1 / math.sqrt(f)),
            f"{p}.attn_norm.weight": np.ones(d, np.float32), f"{p}.ffn_norm.weight": np.ones(d, np.float32),
        })
    save_model(build_llama_model(hp, weights, 32, unpermute_qk=False), path)


# ------------------------------------------------------------------------ the repository


def _generation_of(real: ModelManifest, shape: Shape) -> dict:
    generation = json.loads(json.dumps(real.generation))
    if shape.arch == "bert":
        generation.update(embedding_dim=shape.hidden, max_length=128)
        return generation
    head_dim = shape.hidden // shape.heads
    generation.update(num_layers=shape.layers, num_attention_heads=shape.heads, num_kv_heads=shape.kv_heads,
                      head_dim=head_dim, hidden_size=shape.hidden, max_position_embeddings=2048)
    generation["past_key_values"]["num_layers"] = shape.layers
    return generation


def build_one(repository: ModelRepository, real: ModelRepository, name: str, shape: Shape, seed: int,
              warm_cache: bool = True) -> ModelManifest:
    """Writes one synthetic model (unless it is there) and its optimised graph into the host's cache."""
    if repository.exists(name, "1"):
        manifest = repository.get(name, "1")
    else:
        source = real.get(ENCODER_TOKENIZER_FROM if shape.arch == "bert" else DECODER_TOKENIZER_FROM)

        def build(folder: Path) -> ModelManifest:
            (write_bert if shape.arch == "bert" else write_llama)(folder / "model.onnx", shape, seed)
            shutil.copyfile(source.path_of("tokenizer"), folder / "tokenizer.json")
            return ModelManifest(
                name=name, version="1", task="embedding" if shape.arch == "bert" else "text-generation",
                architecture=shape.arch, files={"model": "model.onnx", "tokenizer": "tokenizer.json"},
                source={"kind": "synthetic", "builder": "bench/synthetic_fleet.py", "shape": shape.label,
                        "seed": seed, "tokenizer_from": source.name},
                licence="synthetic (random weights)", generation=_generation_of(source, shape),
                extra={"params": shape.params, "synthetic": True})

        manifest = repository.write_version(name, "1", build)
    if warm_cache:
        from services.model_host.loader import SessionSettings, create_session, default_optimized_cache

        create_session(manifest, SessionSettings(optimized_cache=default_optimized_cache()))
    return manifest


def link_real_fleet(repository_root: Path, real_root: Path, names: list[str]) -> list[str]:
    """Links the real fleet's built models into the bench's repository; returns those missing."""
    missing = []
    for name in names:
        target, link = real_root / name, repository_root / name
        if not (target / "1" / "manifest.json").exists() and not any(target.glob("*/manifest.json")):
            missing.append(name)
            continue
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(target, target_is_directory=True)
    return missing


def build_all(root: Path = DEFAULT_ROOT, real_root: Path | None = None, log=print) -> list[ModelManifest]:
    real = ModelRepository(real_root or default_repository_root())
    repository = ModelRepository(root / "models")
    missing = [n for n in (ENCODER_TOKENIZER_FROM, DECODER_TOKENIZER_FROM) if not real.exists(n)]
    if missing:
        raise SystemExit(f"the real fleet lacks {missing} (their tokenizers are reused): run `mirador fleet build`")
    manifests = []
    for name, shape, seed in planned():
        fresh = not repository.exists(name, "1")
        started = time.monotonic()
        manifests.append(build_one(repository, real, name, shape, seed))
        if fresh:
            log(f"  built {name} ({manifests[-1].size_bytes / 2**20:.0f} MB) in {time.monotonic() - started:.1f} s")
    return manifests


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    args = parser.parse_args(argv)
    manifests = build_all(args.root)
    sizes = [m.size_bytes / 2**20 for m in manifests]
    print(f"{len(manifests)} synthetic models in {args.root / 'models'}: {sum(sizes) / 1024:.2f} GB, "
          f"{min(sizes):.0f}-{max(sizes):.0f} MB each")
    return 0


if __name__ == "__main__":
    sys.exit(main())

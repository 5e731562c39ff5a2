"""Fused graphs in the model repository: `write_fused` writes one (model.onnx + the base model's
tokenizer and chat facts) into a folder for the fleet builder; `build_version` registers one as a
repository version; the command line builds them by hand.

CLI: ``python -m services.fleet.fused_versions --gguf PATH --bits 32|8|4 [--out ROOT]``
writes a model-repository version (default repository, names ``<base>-fused``,
``<base>-fused-int8``, ``<base>-fused-int4``; ``--exact-q4-1`` → ``-fused-int4-exact``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

from services.fleet.gguf_weights import read_gguf
from services.fleet.llama_graph import (ACCURACY_LEVEL, BLOCK_SIZE, GRAPH_FORMAT, GRAPH_KIND, build_llama_model,
                                        save_model)


def variant_name(base: str, bits: int, exact_q4_1: bool = False) -> str:
    if bits == 32:
        return f"{base}-fused"
    return f"{base}-fused-int{bits}" + ("-exact" if exact_q4_1 and bits == 4 else "")


def _find_base(repository, gguf_path: Path, base_name: str | None):
    """The repository model whose tokenizer and chat facts the fused graph reuses."""
    if base_name:
        return repository.get(base_name)
    for manifest in repository.list_models():
        source_file = str(manifest.source.get("file", ""))
        if source_file and Path(source_file).name == gguf_path.name and "tokenizer" in manifest.files:
            return manifest
    raise SystemExit(f"no model in {repository.root} was built from {gguf_path.name}; "
                     "pass --base NAME (a model whose tokenizer.json and chat facts to reuse)")


def to_float16(model):
    """The float graph in float16 end to end (weights, activations, KV cache, logits), for GPU
    providers: ONNX Runtime's own converter; integer inputs (ids, mask) stay as they are."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(model, keep_io_types=False, disable_shape_infer=True)


def write_fused(folder: Path, gguf_path: Path, base, bits: int, *, lm_head_bits: int | None = None,
                symmetric: bool = False, exact_q4_1: bool = False, dtype: str = "float32") -> tuple[dict, dict]:
    """Writes model.onnx (and the base model's tokenizer.json) into `folder`; returns the
    manifest's `generation` and `extra` facts. `base` is the repository model whose
    tokenizer and chat facts the fused graph reuses. `dtype` float16 (bits 32 only): the
    GPU variant, float16 weights, KV cache and logits."""
    if dtype not in ("float32", "float16") or (dtype == "float16" and bits != 32):
        raise ValueError(f"dtype {dtype!r} with {bits} bits: float16 is for the float graph (bits 32) only")
    started = time.perf_counter()
    hp, weights, metadata = read_gguf(gguf_path)
    read_s = time.perf_counter() - started
    model = build_llama_model(hp, weights, bits, lm_head_bits=lm_head_bits, symmetric=symmetric,
                              exact_q4_1=exact_q4_1)
    if dtype == "float16":
        model = to_float16(model)
    graph_s = time.perf_counter() - started - read_s
    save_model(model, folder / "model.onnx")
    shutil.copyfile(base.path_of("tokenizer"), folder / "tokenizer.json")
    generation = dict(base.generation)
    generation.update({
        "input_names": ["input_ids", "attention_mask", "logits_to_keep"],
        "output_names": ["logits"],
        # GroupQueryAttention refuses batch > 1 with several new tokens on a non-empty cache.
        "batched_continuation": False,
        "past_key_values": {
            "input_pattern": "past_key_values.{layer}.{kind}",
            "output_pattern": "present.{layer}.{kind}",
            "kinds": ["key", "value"],
            "num_layers": hp.num_layers,
            "layout": ["batch", "num_kv_heads", "sequence", "head_dim"],
        },
        "num_layers": hp.num_layers,
        "num_attention_heads": hp.num_heads,
        "num_kv_heads": hp.num_kv_heads,
        "head_dim": hp.head_dim,
        "hidden_size": hp.hidden_size,
        "vocab_size": hp.vocab_size,
        "max_position_embeddings": hp.max_position_embeddings,
        "dtype": dtype,  # of the KV cache and the logits
        # GroupQueryAttention takes one preallocated buffer as both past and present (IO binding)
        # and per-row lengths: the model host's engine decodes its sequences as one ragged batch.
        "kv_cache": "shared-buffer",
    })
    extra = {
        "graph": GRAPH_KIND,
        "graph_format": GRAPH_FORMAT,
        "bits": bits,
        "lm_head_bits": lm_head_bits or bits,
        "exact_q4_1": exact_q4_1 and bits == 4,
        "zero_points": None if bits == 32 else ("default (symmetric)" if symmetric else "uint8 per block"),
        "block_size": BLOCK_SIZE if bits != 32 else None,
        "accuracy_level": ACCURACY_LEVEL if bits != 32 else None,
        "attention_mask": "per-row lengths from its sum: left-aligned rows, no left padding",
        "batch_limits": "batch > 1 with several new tokens on a non-empty cache is refused by "
                        "GroupQueryAttention (score_options' option rows): step such rows in lockstep, one token each",
        "tokenizer_from": base.reference,
        "hparams": asdict(hp),
        "gguf": {"file": gguf_path.name, "file_type": metadata.get("file_type")},
        "build_timings": {"read_gguf_s": round(read_s, 1), "graph_s": round(graph_s, 1)},
    }
    return generation, extra


def build_version(gguf_path: Path, bits: int, repository, *, base_name: str | None = None, name: str | None = None,
                  version: str = "1", replace: bool = False, lm_head_bits: int | None = None,
                  symmetric: bool = False, exact_q4_1: bool = False, log=print):
    from services.common.model_repository import ModelManifest

    base = _find_base(repository, gguf_path, base_name)
    name = name or variant_name(base.name, bits, exact_q4_1)
    started = time.perf_counter()

    def build(folder: Path) -> ModelManifest:
        generation, extra = write_fused(folder, gguf_path, base, bits, lm_head_bits=lm_head_bits,
                                        symmetric=symmetric, exact_q4_1=exact_q4_1)
        return ModelManifest(
            name=name, version=version, task="text-generation", files={"model": "model.onnx", "tokenizer": "tokenizer.json"},
            architecture="llama", source=dict(base.source), licence=base.licence, generation=generation,
            extra={**extra, "built_by": "python -m services.fleet.fused_versions"},
        )

    manifest = repository.write_version(name, version, build, replace=replace)
    log(f"{manifest.reference}: {manifest.size_bytes / 2**20:.0f} MiB in {time.perf_counter() - started:.0f} s "
        f"→ {manifest.directory}")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.fleet.fused_versions", description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", type=Path, required=True, help="llama-architecture GGUF file")
    parser.add_argument("--bits", type=int, choices=(32, 8, 4), action="append", required=True,
                        help="32 (float MatMul) or 8/4 (MatMulNBits); repeat to build several")
    parser.add_argument("--out", type=Path, default=None,
                        help="model repository root (default: $MIRADOR_MODEL_REPOSITORY or ~/.cache/mirador/models)")
    parser.add_argument("--base", default=None, help="repository model to take tokenizer.json and chat facts from "
                        "(default: the one whose manifest names this GGUF file)")
    parser.add_argument("--name", default=None, help="model name (default: <base>-fused[-int8|-int4])")
    parser.add_argument("--version", default="1")
    parser.add_argument("--lm-head-bits", type=int, choices=(32, 8, 4), default=None,
                        help="bits of the output projection (default: same as --bits)")
    parser.add_argument("--symmetric", action="store_true",
                        help="no zero points for re-quantized weights (faster MatMulNBits, less accurate)")
    parser.add_argument("--exact-q4-1", action="store_true",
                        help="4-bit: keep Q4_1 blocks exact (codes as they are + a float MatMul on block sums "
                             "for the minimums); default name <base>-fused-int4-exact, lm_head 8-bit")
    parser.add_argument("--replace", action="store_true", help="overwrite an existing version")
    args = parser.parse_args(argv)
    from services.common.model_repository import ModelRepository

    repository = ModelRepository(args.out)
    if args.name and len(args.bits) > 1:
        parser.error("--name with several --bits would write them all to one name")
    for bits in args.bits:
        lm_head_bits = args.lm_head_bits
        if lm_head_bits is None and args.exact_q4_1 and bits == 4:
            lm_head_bits = 8
        build_version(args.gguf, bits, repository, base_name=args.base, name=args.name, version=args.version,
                      replace=args.replace, lm_head_bits=lm_head_bits, symmetric=args.symmetric,
                      exact_q4_1=args.exact_q4_1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

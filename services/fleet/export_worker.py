"""The heavy part of a build, run in a child process:

    python -m services.fleet.export_worker SPEC.json RESULT.json

A child process keeps torch/transformers out of the caller, returns all their
memory when it exits, and lets the caller measure the peak. The spec names the
recipe, the unpacked source and the folder to write; the result says which files
were written and the facts for the manifest."""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from services.fleet.graph_facts import describe_decoder_io, describe_encoder_io, graph_io
from services.fleet.recipes import SOURCE_GGUF, SOURCE_HF_FOLDER

TOOLCHAIN = ("torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime", "gguf")


def toolchain_versions() -> dict[str, str]:
    versions = {}
    for package in TOOLCHAIN:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


def _optimum_export(source_dir: Path, output_dir: Path, task: str) -> None:
    from optimum.exporters.onnx import main_export

    # library_name="transformers": a sentence-transformers folder would otherwise be
    # exported with its pooling inside and need sentence-transformers installed.
    main_export(
        str(source_dir), output=str(output_dir), task=task, device="cpu",
        library_name="transformers", local_files_only=True,
    )


def _copy_model_files(export_dir: Path, output_dir: Path) -> dict[str, str]:
    """Copy model.onnx (+ external data) and tokenizer.json into the model folder."""
    files = {}
    for path in sorted(export_dir.iterdir()):
        if path.name == "model.onnx" or path.name.startswith("model.onnx_data") or path.name == "model.onnx.data":
            shutil.copy2(path, output_dir / path.name)
    files["model"] = "model.onnx"
    if (export_dir / "tokenizer.json").exists():
        shutil.copy2(export_dir / "tokenizer.json", output_dir / "tokenizer.json")
        files["tokenizer"] = "tokenizer.json"
    return files


def export_gguf_causal_lm(recipe: dict[str, Any], gguf_path: Path, output_dir: Path, work_dir: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    timings = {}
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    hf_dir = work_dir / "hf"
    model.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    # save_pretrained copies the whole GGUF as tokenizer.model; tokenizer.json suffices.
    (hf_dir / "tokenizer.model").unlink(missing_ok=True)
    config = model.config
    del model
    timings["gguf_to_transformers_s"] = round(time.perf_counter() - started, 1)

    started = time.perf_counter()
    export_dir = work_dir / "onnx"
    _optimum_export(hf_dir, export_dir, recipe["export_task"])
    timings["onnx_export_s"] = round(time.perf_counter() - started, 1)

    files = _copy_model_files(export_dir, output_dir)
    inputs, outputs = graph_io(output_dir / "model.onnx")
    overrides = recipe.get("generation_overrides") or {}
    stop_tokens = overrides.get("stop_tokens") or []
    stop_ids = [tokenizer.convert_tokens_to_ids(token) for token in stop_tokens]
    if any(i is None or i == tokenizer.unk_token_id for i in stop_ids):
        raise RuntimeError(f"stop tokens {stop_tokens} are not all in the vocabulary: {stop_ids}")
    num_heads = config.num_attention_heads
    generation = {
        **describe_decoder_io(inputs, outputs),
        "num_layers": config.num_hidden_layers,
        "num_attention_heads": num_heads,
        "num_kv_heads": getattr(config, "num_key_value_heads", None) or num_heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // num_heads,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_position_embeddings,
        "bos_token_id": tokenizer.bos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_ids": stop_ids or [tokenizer.eos_token_id],
        "chat_template": tokenizer.chat_template,
        "dtype": "float32",
        **{k: v for k, v in overrides.items() if k != "stop_tokens"},
        "stop_tokens": stop_tokens,
    }
    return {
        "files": files,
        "architecture": config.model_type,
        "generation": generation,
        "timings": timings,
    }


def export_hf_encoder(recipe: dict[str, Any], model_dir: Path, output_dir: Path, work_dir: Path) -> dict[str, Any]:
    started = time.perf_counter()
    export_dir = work_dir / "onnx"
    _optimum_export(model_dir, export_dir, recipe["export_task"])
    timings = {"onnx_export_s": round(time.perf_counter() - started, 1)}
    files = _copy_model_files(export_dir, output_dir)
    inputs, outputs = graph_io(output_dir / "model.onnx")
    config = json.loads((model_dir / "config.json").read_text())
    generation = {
        **describe_encoder_io(inputs, outputs),
        **_sentence_transformers_pooling(model_dir),
        "embedding_dim": config["hidden_size"],
        "hidden_output": "last_hidden_state",
        **(recipe.get("generation_overrides") or {}),
    }
    return {"files": files, "architecture": config["model_type"], "generation": generation, "timings": timings}


def _sentence_transformers_pooling(model_dir: Path) -> dict[str, Any]:
    """Pooling, normalisation and max length as the sentence-transformers folder declares them."""
    facts: dict[str, Any] = {"pooling": "mean", "normalize": False}
    modules_file = model_dir / "modules.json"
    if modules_file.exists():
        modules = json.loads(modules_file.read_text())
        facts["normalize"] = any(m.get("type", "").endswith(".Normalize") for m in modules)
        for module in modules:
            if module.get("type", "").endswith(".Pooling"):
                pooling = json.loads((model_dir / module["path"] / "config.json").read_text())
                modes = [k.removeprefix("pooling_mode_").removesuffix("_tokens") for k, v in pooling.items()
                         if k.startswith("pooling_mode_") and v is True]
                if len(modes) != 1:
                    raise RuntimeError(f"unsupported pooling configuration {pooling}")
                facts["pooling"] = modes[0]  # "mean", "cls", "max"
    bert_config = model_dir / "sentence_bert_config.json"
    if bert_config.exists():
        facts["max_length"] = json.loads(bert_config.read_text()).get("max_seq_length")
    return facts


EXPORTERS = {SOURCE_GGUF: export_gguf_causal_lm, SOURCE_HF_FOLDER: export_hf_encoder}


def run(spec: dict[str, Any]) -> dict[str, Any]:
    recipe = spec["recipe"]
    exporter = EXPORTERS[recipe["source_kind"]]
    output_dir = Path(spec["output_dir"])
    with tempfile.TemporaryDirectory(dir=spec.get("work_root"), prefix=f"{recipe['name']}-") as work:
        result = exporter(recipe, Path(spec["source"]), output_dir, Path(work))
    result["toolchain"] = toolchain_versions()
    # ru_maxrss is in KiB on Linux.
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return result


def main(argv: list[str]) -> int:
    spec_path, result_path = map(Path, argv)
    result = run(json.loads(spec_path.read_text()))
    result_path.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

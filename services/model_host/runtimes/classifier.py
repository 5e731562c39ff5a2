"""Text classifiers: one ONNX graph from token ids to `probabilities` [batch, labels].

The manifest (task `classification`) names the labels, the graph's inputs, the
output and the tokenizer's max_length; calibration (a temperature) is baked into
the graph by the builder, so the probabilities served are the calibrated ones.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from services.common.model_repository import ModelManifest
from services.common.decision_prompt import question_of
from services.model_host.runtimes import ModelRuntime
from services.model_host.runtimes.tokenizer_files import TokenizerSource, source_of

BATCH_SIZE = 16


def request_text(messages: list[tuple[str, str]], prompt: str, options: list[str]) -> str:
    """What a classifier reads from a Score request: the prompt, or the last user message without
    the decision instructions written for language models (services/common/decision_prompt.py),
    so it sees the question as it was trained to see texts."""
    if prompt:
        return prompt
    return question_of(next((content for role, content in reversed(messages) if role == "user"), ""), options)


class ClassifierRuntime(ModelRuntime):
    def __init__(self, manifest: ModelManifest, session: ort.InferenceSession, tokenizer: Tokenizer | TokenizerSource):
        super().__init__(manifest, session)
        generation = manifest.generation
        self.labels: list[str] = [str(label) for label in generation.get("labels") or []]
        if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels):
            raise ValueError(f"{manifest.reference}: generation.labels must list at least two distinct labels")
        self.output_name = generation.get("output", "probabilities")
        outputs = {o.name: o for o in session.get_outputs()}
        if self.output_name not in outputs:
            raise ValueError(f"{manifest.reference}: the graph has no output {self.output_name!r}; "
                             f"it has {', '.join(outputs)}")
        width = outputs[self.output_name].shape[-1]
        if isinstance(width, int) and width != len(self.labels):
            raise ValueError(f"{manifest.reference}: the graph gives {width} probabilities for "
                             f"{len(self.labels)} labels")
        self.input_names = {i.name for i in session.get_inputs()}
        self.max_length = int(generation.get("max_length", 256))
        self.truncation_side = str(generation.get("truncation_side", "right"))
        if self.truncation_side not in ("right", "left"):
            raise ValueError(f"{manifest.reference}: generation.truncation_side must be 'right' or 'left', "
                             f"not {self.truncation_side!r}")
        calibration = generation.get("calibration") or {}
        self.temperature = calibration.get("temperature")
        self.calibration_fit_on = calibration.get("fit_on")
        self.tokenizer = self._serving_tokenizer(tokenizer)

    def _serving_tokenizer(self, tokenizer: Tokenizer | TokenizerSource) -> Tokenizer:
        # Reads client text as text, never as [SEP]/[CLS]; never changed once built (it may be shared
        # with the models of the same tokenizer file: runtimes/tokenizer_files.py).
        return source_of(tokenizer).plain(truncate_to=self.max_length, side=self.truncation_side)

    @property
    def calibration_source(self) -> str:
        if self.temperature is None:
            return "classifier probability, not calibrated (no calibration in the manifest)"
        return (f"temperature-scaled classifier probability (T={float(self.temperature):.2f} in the graph, "
                f"fit on {self.calibration_fit_on or 'unknown data'})")

    def token_counts(self, texts: list[str]) -> list[int]:
        return [len(e.ids) for e in self.tokenizer.encode_batch(texts)]

    def classify(self, texts: list[str]) -> np.ndarray:
        """Probabilities [len(texts), len(labels)] over the manifest's labels."""
        encodings = self.tokenizer.encode_batch(list(texts))
        order = np.argsort([len(e.ids) for e in encodings], kind="stable")  # similar lengths share a batch
        result = np.zeros((len(texts), len(self.labels)), dtype=np.float64)
        for start in range(0, len(order), BATCH_SIZE):
            rows = order[start: start + BATCH_SIZE]
            width = max(1, max(len(encodings[i].ids) for i in rows))
            ids = np.zeros((len(rows), width), dtype=np.int64)
            mask = np.zeros_like(ids)
            for row, index in enumerate(rows):
                tokens = encodings[index].ids
                ids[row, : len(tokens)] = tokens
                mask[row, : len(tokens)] = 1
            feeds = {"input_ids": ids, "attention_mask": mask}
            if "token_type_ids" in self.input_names:
                feeds["token_type_ids"] = np.zeros_like(ids)
            result[rows] = self.session.run([self.output_name], feeds)[0]
        return result


class HeadClassifierRuntime(ClassifierRuntime):
    """A classifier declared as a head on a shared encoder (`fleet.NAME.encoder`): its own session is
    only the head graph (`sentence_embedding` [B, D] -> `probabilities`), run on the pooled embedding
    the encoder's runtime computes once per text for all its heads (`EncoderRuntime.embed_for_heads`).
    The manifest's `generation.head` says what the head expects of the embedding; a mismatch is
    refused at load rather than served as wrong scores."""

    def __init__(self, manifest: ModelManifest, session: ort.InferenceSession, tokenizer: Tokenizer | None,
                 encoder):
        self.encoder = encoder  # before the base class picks the tokenizer: the head may share the encoder's
        super().__init__(manifest, session, tokenizer)
        head = manifest.generation.get("head") or {}
        self.head_input = head.get("input", "sentence_embedding")
        if self.head_input not in self.input_names:
            raise ValueError(f"{manifest.reference}: the head graph has no input {self.head_input!r}")
        wanted = {"pooling": head.get("pooling", "mean"), "normalize": bool(head.get("normalize", True))}
        has = {"pooling": encoder.pooling, "normalize": encoder.normalize}
        if wanted != has:
            raise ValueError(f"{manifest.reference}: the head was trained on {wanted} embeddings; "
                             f"{encoder.manifest.reference} gives {has}")
        width, gives = session.get_inputs()[0].shape[-1], encoder.session.get_outputs()[0].shape[-1]
        if isinstance(width, int) and isinstance(gives, int) and width != gives:
            raise ValueError(f"{manifest.reference}: the head reads {width}-d embeddings; "
                             f"{encoder.manifest.reference} gives {gives}-d")
        if self.tokenizer is not encoder.tokenizer and self.tokenizer.get_vocab() != encoder.tokenizer.get_vocab():
            raise ValueError(f"{manifest.reference}: its tokenizer is not {encoder.manifest.reference}'s; "
                             "a head must be trained on its encoder's tokens")

    def _serving_tokenizer(self, tokenizer: Tokenizer | None) -> Tokenizer:
        """The encoder's tokenizer wherever it is the head's, truncation included (the usual case). A tokenizer
        is ~4 MB here, 40x the head's session, so sharing it is most of what a head saves. `None` means the
        head's tokenizer file is its encoder's but for the truncation and padding settings (load_runtime read
        neither file into a tokenizer), so no copy is built just to compare: the heap such a copy leaves
        behind was counted as the head's size."""
        shared = self.encoder.tokenizer
        if tokenizer is None:
            truncation = shared.truncation or {}
            if (truncation.get("max_length"), truncation.get("direction", "right")) == \
                    (self.max_length, self.truncation_side) and shared.padding is None:
                return shared
            tokenizer = shared
        own = super()._serving_tokenizer(tokenizer)
        return shared if own.to_str() == shared.to_str() else own

    def classify(self, texts: list[str]) -> np.ndarray:
        rows = [e.ids for e in self.tokenizer.encode_batch(list(texts))]
        embeddings = self.encoder.embed_for_heads(rows)
        return self.session.run([self.output_name], {self.head_input: embeddings})[0].astype(np.float64)

"""Sentence encoders: tokenize a batch, run, pool over the attention mask, normalise."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from services.common.model_repository import ModelManifest
from services.model_host.runtimes import ModelRuntime
from services.model_host.runtimes.text import plain_text_tokenizer


class EncoderRuntime(ModelRuntime):
    def __init__(self, manifest: ModelManifest, session: ort.InferenceSession, tokenizer: Tokenizer):
        super().__init__(manifest, session)
        generation = manifest.generation
        self.max_length = int(generation.get("max_length", 256))
        self.normalize = bool(generation.get("normalize", True))
        self.pooling = generation.get("pooling", "mean")
        if self.pooling not in ("mean", "cls"):
            raise ValueError(f"{manifest.reference}: pooling {self.pooling!r} is not supported; use mean or cls")
        self.output_name = generation.get("hidden_output") or session.get_outputs()[0].name
        self.input_names = {i.name for i in session.get_inputs()}
        # Own copy (padding settings are per instance) that reads client text as text, never as [SEP]/[CLS].
        self.tokenizer = plain_text_tokenizer(tokenizer)
        self.tokenizer.enable_truncation(self.max_length)
        self.tokenizer.no_padding()

    @property
    def dimension(self) -> int:
        return int(self.session.get_outputs()[0].shape[-1])

    def token_count(self, text: str) -> int:
        return len(self.tokenizer.encode(text).ids)

    def embed(self, texts: list[str]) -> np.ndarray:
        """Returns one row per text, L2-normalised when the manifest says so."""
        encodings = self.tokenizer.encode_batch(texts)
        width = max(len(e.ids) for e in encodings)
        ids = np.zeros((len(texts), width), dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, encoding in enumerate(encodings):
            ids[row, : len(encoding.ids)] = encoding.ids
            mask[row, : len(encoding.ids)] = 1
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.input_names:
            feeds["token_type_ids"] = np.zeros_like(ids)
        hidden = self.session.run([self.output_name], feeds)[0]
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            weights = mask[..., None].astype(hidden.dtype)
            pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
        if self.normalize:
            pooled = pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        return pooled.astype(np.float32)

"""Sentence encoders: tokenize a batch, run, pool over the attention mask, normalise."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from services.common.model_repository import ModelManifest
from services.model_host.runtimes import ModelRuntime
from services.model_host.runtimes.embedding_cache import EmbeddingCache
from services.model_host.runtimes.tokenizer_files import TokenizerSource, source_of

HEAD_BATCH_SIZE = 16  # as ClassifierRuntime batches: rows of similar length together


class EncoderRuntime(ModelRuntime):
    def __init__(self, manifest: ModelManifest, session: ort.InferenceSession, tokenizer: Tokenizer | TokenizerSource):
        super().__init__(manifest, session)
        generation = manifest.generation
        self.max_length = int(generation.get("max_length", 256))
        self.normalize = bool(generation.get("normalize", True))
        self.pooling = generation.get("pooling", "mean")
        if self.pooling not in ("mean", "cls"):
            raise ValueError(f"{manifest.reference}: pooling {self.pooling!r} is not supported; use mean or cls")
        self.output_name = generation.get("hidden_output") or session.get_outputs()[0].name
        self.input_names = {i.name for i in session.get_inputs()}
        # Reads client text as text, never as [SEP]/[CLS]; never changed once built (it may be shared
        # with the models of the same tokenizer file: runtimes/tokenizer_files.py).
        self.tokenizer = source_of(tokenizer).plain(truncate_to=self.max_length)
        self.head_cache = EmbeddingCache()  # pooled embeddings of the texts its heads were asked about

    @property
    def dimension(self) -> int:
        return int(self.session.get_outputs()[0].shape[-1])

    def token_count(self, text: str) -> int:
        return len(self.tokenizer.encode(text).ids)

    def embed(self, texts: list[str]) -> np.ndarray:
        """Returns one row per text, L2-normalised when the manifest says so."""
        return self._pooled([e.ids for e in self.tokenizer.encode_batch(texts)])

    def embed_for_heads(self, rows: list[list[int]]) -> np.ndarray:
        """Pooled embeddings of token ids (a head's tokenizer's), each computed once while it stays in
        `head_cache`, whichever head asks. Uncached rows run in batches of similar lengths."""
        return self.head_cache.get_or_compute(rows, self._pooled_sorted)

    def _pooled_sorted(self, rows: list[list[int]]) -> np.ndarray:
        order = np.argsort([len(row) for row in rows], kind="stable")
        out = None
        for start in range(0, len(order), HEAD_BATCH_SIZE):
            chosen = order[start: start + HEAD_BATCH_SIZE]
            pooled = self._pooled([rows[i] for i in chosen])
            if out is None:
                out = np.zeros((len(rows), pooled.shape[1]), dtype=np.float32)
            out[chosen] = pooled
        return out

    def _pooled(self, rows: list[list[int]]) -> np.ndarray:
        width = max(1, max(len(row) for row in rows))
        ids = np.zeros((len(rows), width), dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, tokens in enumerate(rows):
            ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = 1
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

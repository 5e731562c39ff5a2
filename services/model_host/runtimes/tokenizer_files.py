"""The tokenizers a runtime reads from its model's tokenizer file, built once per host process
and shared by every loaded model whose file is the same (the fine-tunes of one base model, the
quantized variants of one model).

Reading a tokenizer.json is a large part of a small model's load: 30 ms for a BERT WordPiece
vocabulary, 90-100 ms for SmolLM2's BPE vocabulary, and a decoder read it twice (as written and as
the copy that reads text as text), which was 200 of the 370 ms a 64 MB decoder took to load
(AMD EPYC, 2 cores; docs/placement.md, "Tokenizers"). Shared, the second model of a base loads in
about its session's time, and holds no copy of its own.

A shared tokenizer is never changed once built: a setting changed while another thread encodes
with it would fail, and would change the other model's answers. So each variant a runtime asks
for (the file as written; the serving copy with its truncation) is an entry of its own, keyed by
the file's digest and the variant, and held while a loaded runtime holds it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Tokenizer

from services.model_host.runtimes.text import plain_text_tokenizer


class TokenizerSource:
    """What a runtime asks of its tokenizer file. This base builds a fresh tokenizer per call from
    one already read (tests, benches, a model whose file has no digest)."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer

    def as_written(self) -> Tokenizer:
        """The tokenizer as its file says (decoding, the chat template's markers)."""
        return self._tokenizer

    def plain(self, truncate_to: int | None = None, side: str = "right") -> Tokenizer:
        """A tokenizer that reads client text as text (see `plain_text_tokenizer`); with `truncate_to`,
        truncating to that many tokens (cutting a long text's `side`: "left" keeps its end) and never
        padding (encoders and classifiers)."""
        return _truncating(plain_text_tokenizer(self._tokenizer), truncate_to, side)

    def release(self) -> None:
        """Called when the runtime is closed (nothing to give back for a tokenizer of its own)."""


def _truncating(tokenizer: Tokenizer, truncate_to: int | None, side: str = "right") -> Tokenizer:
    """`tokenizer`, set to truncate to `truncate_to` tokens on `side` and never pad (None: as its file says)."""
    if truncate_to is not None:
        tokenizer.enable_truncation(truncate_to, direction=side)
        tokenizer.no_padding()
    return tokenizer


def source_of(tokenizer: Tokenizer | TokenizerSource) -> TokenizerSource:
    return tokenizer if isinstance(tokenizer, TokenizerSource) else TokenizerSource(tokenizer)


@dataclass
class _Entry:
    tokenizer: Tokenizer
    holders: int = 0


@dataclass
class SharedTokenizers:
    """Every shared tokenizer of one host process. Loads acquire (on the loading thread), closes
    release (on the event loop), so a lock guards the table."""

    entries: dict[tuple, _Entry] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def source(self, path: Path, digest: str) -> SharedTokenizerFile:
        return SharedTokenizerFile(self, path, digest)

    def acquire(self, key: tuple, build) -> Tokenizer:
        with self._lock:
            entry = self.entries.get(key)
            if entry is None:
                # built under the lock: two loads of one base would otherwise both read the file
                entry = self.entries[key] = _Entry(build())
            entry.holders += 1
            return entry.tokenizer

    def release(self, key: tuple) -> None:
        with self._lock:
            entry = self.entries.get(key)
            if entry is None:
                return
            entry.holders -= 1
            if entry.holders <= 0:
                del self.entries[key]


class SharedTokenizerFile(TokenizerSource):
    """One runtime's view of a shared tokenizer file: what it acquired is released when it closes."""

    def __init__(self, shared: SharedTokenizers, path: Path, digest: str):
        self.shared, self.path, self.digest = shared, path, digest
        self._held: list[tuple] = []

    def _acquire(self, variant: tuple, build) -> Tokenizer:
        key = (self.digest, *variant)
        tokenizer = self.shared.acquire(key, build)
        self._held.append(key)
        return tokenizer

    def as_written(self) -> Tokenizer:
        return self._acquire(("as written",), lambda: Tokenizer.from_file(str(self.path)))

    def plain(self, truncate_to: int | None = None, side: str = "right") -> Tokenizer:
        def build() -> Tokenizer:
            tokenizer = Tokenizer.from_file(str(self.path))
            tokenizer.encode_special_tokens = True  # what plain_text_tokenizer sets, without a copy
            return _truncating(tokenizer, truncate_to, side)

        return self._acquire(("plain", truncate_to, side), build)

    def release(self) -> None:
        held, self._held = self._held, []
        for key in held:
            self.shared.release(key)

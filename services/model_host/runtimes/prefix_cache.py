"""The beginnings of prompts a decoder has just read, with their KV caches, so that a prompt
starting the same way is prefilled from where they part.

Every consensus question is asked with the same decision instructions (a system turn of ~27
tokens out of ~70, services/common/decision_prompt.py), and a Score's prefill was most of the
model host's work in the soak: Score takes the longest cached beginning (`longest`/`add`).
The engine keeps its own cache of exact shared beginnings (`get`/`put`: a chat's system turn,
computed by the same prefill chunk whatever follows it, services/model_host/engine/scheduler.py),
so a generation's tokens never depend on what was asked before it.

Each cache is bounded in tokens (`PREFIX_CACHE_TOKENS`; a decoder's two are counted in its
size by the engine hook) and evicts the least recently used entry. A K/V row at position i
depends only on tokens 0..i, so any leading slice of a cached entry is the cache of that
shorter prefix.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable

import numpy as np

PREFIX_CACHE_TOKENS = 256  # tokens of KV cache per cache (SmolLM2 fp32: 46 KB a token)
PREFIX_CACHES_PER_DECODER = 2  # Score's and the engine's
MIN_REUSE_TOKENS = 8  # a shorter common beginning is not worth a second forward pass


def common_prefix(a: tuple[int, ...], b: list[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differ[0]) if differ.size else n


class PrefixCache:
    def __init__(self, capacity_tokens: int = PREFIX_CACHE_TOKENS, min_tokens: int = MIN_REUSE_TOKENS,
                 on_reuse: Callable[[int], None] | None = None):
        self.capacity_tokens = capacity_tokens
        self.min_tokens = min_tokens
        self.on_reuse = on_reuse  # called with the tokens of each hit (metrics)
        self._entries: OrderedDict[tuple[int, ...], dict[str, np.ndarray]] = OrderedDict()  # least recent first
        self._lock = threading.Lock()
        self.reused_tokens = 0  # tokens not prefilled again, since load (tests, metrics)

    @property
    def held_tokens(self) -> int:
        return sum(len(key) for key in self._entries)

    def longest(self, ids: list[int]) -> tuple[int, dict[str, np.ndarray] | None]:
        """The longest cached beginning of `ids` (leaving at least its last token to run) and that
        beginning's KV cache (read-only views); (0, None) below `min_tokens`."""
        with self._lock:
            best, best_key = 0, None
            for key in self._entries:
                length = min(common_prefix(key, ids), len(ids) - 1)
                if length > best:
                    best, best_key = length, key
            if best < self.min_tokens:
                return 0, None
            self._entries.move_to_end(best_key)
            self._reused(best)
            return best, {name: value[:, :, :best, :] for name, value in self._entries[best_key].items()}

    def add(self, ids: list[int], past: dict[str, np.ndarray]) -> None:
        """Keeps the first tokens of a prompt just prefilled (at most half the capacity, so one long
        prompt never takes it all) with their KV cache."""
        self._keep(tuple(ids[: min(len(ids), self.capacity_tokens // 2)]), past)

    def get(self, ids: list[int]) -> dict[str, np.ndarray] | None:
        """The KV cache of exactly `ids`, kept by `put`; None when it is not here."""
        key = tuple(ids)
        with self._lock:
            past = self._entries.get(key)
            if past is not None:
                self._entries.move_to_end(key)
                self._reused(len(key))
            return past

    def put(self, ids: list[int], past: dict[str, np.ndarray]) -> None:
        """Keeps exactly `ids` (when at most half the capacity) with their KV cache."""
        if len(ids) <= self.capacity_tokens // 2:
            self._keep(tuple(ids), past)

    def _reused(self, tokens: int) -> None:
        self.reused_tokens += tokens
        if self.on_reuse is not None:
            self.on_reuse(tokens)

    def _keep(self, key: tuple[int, ...], past: dict[str, np.ndarray]) -> None:
        keep = len(key)
        if keep < self.min_tokens:
            return
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return
            # copies: a slice would hold the whole prompt's arrays alive
            self._entries[key] = {name: np.ascontiguousarray(value[:, :, :keep, :]) for name, value in past.items()}
            while self.held_tokens > self.capacity_tokens:
                self._entries.popitem(last=False)

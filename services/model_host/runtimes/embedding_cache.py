"""A small bounded cache of pooled embeddings, keyed by token ids, shared by the heads of one encoder.

The heads of a consensus fan-out are asked about the same text by separate, near-simultaneous
calls. Each head's call looks its text up here: the first computes the embedding, a call for the
same ids that arrives while it runs waits for that result instead of running the encoder again,
and later calls find it stored. Why a cache and not a batcher: a batcher would have to hold the
first call back (a queue delay) in the hope that the others arrive, and would still need to spot
duplicate texts; the cache needs no delay, and on CPU, batching unequal lengths does not pay
(FACTS.md: batches padded to their longest member were slower than none on 2 cores).

Keys are token ids, not raw text: two heads whose tokenizers truncate differently must not share
an embedding, and ids say exactly what the encoder saw. Entries are one float32 row each (1.5 KB at
384 dimensions); `capacity` bounds the memory.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future
from typing import Callable, Sequence

import numpy as np

Key = tuple[int, ...]


class EmbeddingCache:
    def __init__(self, capacity: int = 512):
        self.capacity = capacity
        self._rows: OrderedDict[Key, np.ndarray] = OrderedDict()
        self._pending: dict[Key, Future] = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0  # rows this cache had to compute

    def __len__(self) -> int:
        return len(self._rows)

    def get_or_compute(self, rows: Sequence[Sequence[int]],
                       compute: Callable[[list[list[int]]], np.ndarray]) -> np.ndarray:
        """One embedding per row of ids; `compute` runs once for the rows nobody has computed or is
        computing, and its result is shared with every caller asking for them."""
        keys = [tuple(row) for row in rows]
        found: dict[Key, np.ndarray] = {}
        waiting: dict[Key, Future] = {}
        mine: dict[Key, Future] = {}
        with self._lock:
            for key in keys:
                if key in found or key in waiting or key in mine:
                    continue
                if key in self._rows:
                    self._rows.move_to_end(key)
                    found[key] = self._rows[key]
                    self.hits += 1
                elif key in self._pending:
                    waiting[key] = self._pending[key]
                    self.hits += 1
                else:
                    mine[key] = self._pending[key] = Future()
                    self.misses += 1
        if mine:
            todo = list(mine)
            try:
                vectors = compute([list(key) for key in todo])
            except BaseException as exc:
                with self._lock:
                    for key, future in mine.items():
                        del self._pending[key]
                        future.set_exception(exc)
                raise
            with self._lock:
                for key, vector in zip(todo, vectors):
                    self._rows[key] = vector
                    self._rows.move_to_end(key)
                    del self._pending[key]
                    mine[key].set_result(vector)
                    found[key] = vector
                while len(self._rows) > self.capacity:
                    self._rows.popitem(last=False)
        for key, future in waiting.items():
            found[key] = future.result()
        return np.stack([found[key] for key in keys]) if keys else np.zeros((0, 0), dtype=np.float32)

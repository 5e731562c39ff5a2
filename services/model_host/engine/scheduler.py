"""Which sequences run in the next iteration: pure bookkeeping, no model and no threads, so
it is tested with fake steps (tests/test_engine_scheduler.py).

A sequence waits (first come, first served) until a slot is free, takes the lowest free
slot, has its prompt prefilled in chunks of at most `prefill_chunk_tokens` (the first chunk
ending where its shared beginning does, which the engine may copy from its prefix cache
instead of running), then decodes
one token per iteration until it finishes or is cancelled, when its slot is free at once.
Each iteration runs one prefill chunk (of the oldest sequence still prefilling) and one
decode step over every decoding sequence: a long prompt joining costs the others at most
one chunk's time per token, never its whole prefill.

Chunk boundaries depend only on the prompt (its shared beginning, then every `chunk` tokens),
never on what else is running or was cached: a sequence's computation is the same alone, in
a full batch, or with its beginning taken from the cache (computed by the same chunk).
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol


class Scheduled(Protocol):
    """What the scheduler needs of a sequence; the engine's `Sequence` has these."""

    prompt_ids: list[int]
    shared_prefix: int  # the first chunk ends here (0: no shared beginning)
    slot: int | None
    prefilled: int  # prompt tokens already in the slot's cache


@dataclass
class Plan:
    prefill: tuple[Scheduled, int, int] | None = None  # (sequence, first prompt index, end)
    decode: list[Scheduled] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return self.prefill is None and not self.decode


class Scheduler:
    def __init__(self, num_slots: int, prefill_chunk_tokens: int):
        if num_slots < 1 or prefill_chunk_tokens < 1:
            raise ValueError("a scheduler needs at least one slot and a chunk of at least one token")
        self.num_slots = num_slots
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.free_slots = list(range(num_slots))  # a heap: the lowest slot first keeps decode batches narrow
        self.waiting: deque[Scheduled] = deque()
        self.prefilling: list[Scheduled] = []
        self.decoding: list[Scheduled] = []

    @property
    def running(self) -> int:
        return len(self.prefilling) + len(self.decoding)

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.decoding)

    def add(self, sequence: Scheduled) -> None:
        sequence.slot, sequence.prefilled = None, 0
        self.waiting.append(sequence)

    def plan(self) -> Plan:
        while self.waiting and self.free_slots:
            sequence = self.waiting.popleft()
            sequence.slot = heapq.heappop(self.free_slots)
            self.prefilling.append(sequence)
        plan = Plan(decode=list(self.decoding))
        if self.prefilling:
            sequence = self.prefilling[0]
            plan.prefill = (sequence, sequence.prefilled, self.chunk_end(sequence, sequence.prefilled))
        return plan

    def chunk_end(self, sequence: Scheduled, start: int) -> int:
        """Where the prefill chunk starting at `start` ends: the shared beginning is chunked on its own."""
        limit = sequence.shared_prefix if start < sequence.shared_prefix else len(sequence.prompt_ids)
        return min(start + self.prefill_chunk_tokens, limit)

    def prefilled(self, sequence: Scheduled, end: int) -> bool:
        """Records a prefill chunk; True when the whole prompt is in (the sequence decodes from now on)."""
        sequence.prefilled = end
        if end < len(sequence.prompt_ids):
            return False
        self.prefilling.remove(sequence)
        self.decoding.append(sequence)
        return True

    def finish(self, sequence: Scheduled) -> None:
        """The sequence leaves (done, failed or cancelled) wherever it is; its slot is free at once."""
        for queue in (self.prefilling, self.decoding):
            if sequence in queue:
                queue.remove(sequence)
        if sequence in self.waiting:
            self.waiting.remove(sequence)
        if sequence.slot is not None:
            heapq.heappush(self.free_slots, sequence.slot)
            sequence.slot = None

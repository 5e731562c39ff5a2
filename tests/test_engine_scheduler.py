"""The engine's scheduler alone, with fake sequences: slots, waiting, chunked prefill, leaving."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from services.model_host.engine.scheduler import Scheduler


@dataclass(eq=False)
class Fake:
    prompt_ids: list[int] = field(default_factory=lambda: [1] * 5)
    slot: int | None = None
    prefilled: int = 0
    shared_prefix: int = 0


def _run_prefills(scheduler: Scheduler) -> list[tuple[Fake, int, int]]:
    """Plans until nothing is left to prefill; returns the chunks in order."""
    chunks = []
    while True:
        plan = scheduler.plan()
        if plan.prefill is None:
            return chunks
        chunks.append(plan.prefill)
        scheduler.prefilled(plan.prefill[0], plan.prefill[2])


def test_sequences_take_the_lowest_free_slots_and_wait_beyond_them():
    scheduler = Scheduler(num_slots=2, prefill_chunk_tokens=100)
    a, b, c = Fake(), Fake(), Fake()
    for s in (a, b, c):
        scheduler.add(s)
    _run_prefills(scheduler)
    assert (a.slot, b.slot, c.slot) == (0, 1, None)
    assert list(scheduler.waiting) == [c]
    assert scheduler.plan().decode == [a, b]


def test_a_leaving_sequence_frees_its_slot_for_the_next_iteration():
    scheduler = Scheduler(num_slots=2, prefill_chunk_tokens=100)
    a, b, c = Fake(), Fake(), Fake()
    for s in (a, b, c):
        scheduler.add(s)
    _run_prefills(scheduler)
    scheduler.finish(a)  # done or cancelled
    assert a.slot is None
    plan = scheduler.plan()
    assert c.slot == 0 and plan.prefill[0] is c
    assert plan.decode == [b]


def test_prefill_runs_in_fixed_chunks_one_per_iteration_beside_the_decodes():
    scheduler = Scheduler(num_slots=4, prefill_chunk_tokens=4)
    running = Fake(prompt_ids=[1, 2])
    scheduler.add(running)
    _run_prefills(scheduler)
    joiner = Fake(prompt_ids=list(range(10)))
    scheduler.add(joiner)
    seen = []
    for _ in range(3):
        plan = scheduler.plan()
        assert plan.decode == [running]  # the running sequence decodes every iteration
        seen.append(plan.prefill[1:])
        scheduler.prefilled(joiner, plan.prefill[2])
    assert seen == [(0, 4), (4, 8), (8, 10)]  # boundaries depend on the prompt only
    assert scheduler.plan().decode == [running, joiner]


def test_a_sequence_cancelled_while_waiting_never_takes_a_slot():
    scheduler = Scheduler(num_slots=1, prefill_chunk_tokens=8)
    a, b = Fake(), Fake()
    scheduler.add(a)
    scheduler.add(b)
    scheduler.plan()
    assert (a.slot, b.slot) == (0, None)
    scheduler.finish(b)  # cancelled while waiting
    scheduler.finish(a)  # the slot b waited for is free now
    assert scheduler.plan().empty and b.slot is None
    assert not scheduler.has_work()
    assert scheduler.free_slots == [0]


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError):
        Scheduler(num_slots=0, prefill_chunk_tokens=8)

"""Dynamic batching: concurrent requests share runs of similar length, answers come back in order."""

import asyncio
from concurrent.futures import ThreadPoolExecutor

from services.model_host.batching import DynamicBatcher


def test_concurrent_requests_are_batched_by_length_and_answered_in_order():
    runs: list[list[str]] = []

    def run_batch(items):
        runs.append(list(items))
        return [item.upper() for item in items]

    async def scenario():
        with ThreadPoolExecutor(2) as executor:
            batcher = DynamicBatcher(run_batch, executor, max_batch_size=3, max_queue_delay_s=0.05)
            requests = [["aaaaaaaaaa", "b"], ["cc"], ["ddddddddddd", "e", "f"]]
            return await asyncio.gather(*(batcher.submit(r) for r in requests))

    answers = asyncio.run(scenario())
    assert answers == [["AAAAAAAAAA", "B"], ["CC"], ["DDDDDDDDDDD", "E", "F"]]
    assert sum(len(run) for run in runs) == 6  # every item ran once
    for run in runs:
        lengths = [len(item) for item in run]
        assert len(run) <= 3 and max(lengths) <= 1.5 * min(lengths)  # similar lengths only, capped


def test_a_failed_batch_fails_every_request_in_it():
    def run_batch(items):
        raise RuntimeError("session gone")

    async def scenario():
        with ThreadPoolExecutor(1) as executor:
            batcher = DynamicBatcher(run_batch, executor, max_batch_size=4, max_queue_delay_s=0.01)
            return await asyncio.gather(batcher.submit(["a"]), batcher.submit(["b"]), return_exceptions=True)

    assert all(isinstance(r, RuntimeError) for r in asyncio.run(scenario()))

"""Dynamic batching: concurrent requests for the same model run as one batch.

A batch closes when it holds `max_batch_size` items or `max_queue_delay_s` has
passed since its first item. Items are sorted by length inside a batch: on a
CPU, padding to the longest member costs more than batching saves unless
lengths are similar (FACTS.md, "Batching on this CPU").
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Callable, Generic, Sequence, TypeVar

# Items padded together differ in length by at most this factor.
MAX_LENGTH_RATIO = 1.5

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass
class _Pending(Generic[Item, Result]):
    items: list[Item]
    future: asyncio.Future


class DynamicBatcher(Generic[Item, Result]):
    def __init__(
        self,
        run_batch: Callable[[list[Item]], Sequence[Result]],
        executor: Executor,
        max_batch_size: int = 16,
        max_queue_delay_s: float = 0.002,
        length_of: Callable[[Item], int] = len,
        on_batch: Callable[[int], None] | None = None,
    ):
        self.run_batch = run_batch
        self.executor = executor
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.length_of = length_of
        self.on_batch = on_batch
        self._queue: list[_Pending] = []
        self._queued_items = 0
        self._timer: asyncio.TimerHandle | None = None

    async def submit(self, items: list[Item]) -> list[Result]:
        """Runs `items` (one request's worth) in some batch; returns their results in order."""
        pending = _Pending(items, asyncio.get_running_loop().create_future())
        self._queue.append(pending)
        self._queued_items += len(items)
        if self._queued_items >= self.max_batch_size:
            self._flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.max_queue_delay_s, self._flush)
        return await pending.future

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._queue, self._queued_items = self._queue, [], 0
        batch = [p for p in batch if not p.future.cancelled()]
        if batch:
            asyncio.get_running_loop().create_task(self._run(batch))

    async def _run(self, batch: list[_Pending]) -> None:
        flat = [(p_index, i_index, item) for p_index, p in enumerate(batch) for i_index, item in enumerate(p.items)]
        flat.sort(key=lambda entry: self.length_of(entry[2]))
        if self.on_batch:
            self.on_batch(len(flat))
        loop = asyncio.get_running_loop()
        buckets = self._buckets(flat)
        try:
            outputs = await asyncio.gather(*(
                loop.run_in_executor(self.executor, self.run_batch, [item for _, _, item in bucket]) for bucket in buckets
            ))
        except Exception as exc:  # noqa: BLE001 - the error belongs to every request in the batch
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        per_request: list[list] = [[None] * len(p.items) for p in batch]
        for bucket, results in zip(buckets, outputs):
            for (p_index, i_index, _), result in zip(bucket, results):
                per_request[p_index][i_index] = result
        for p, values in zip(batch, per_request):
            if not p.future.done():
                p.future.set_result(values)

    def _buckets(self, ordered: list[tuple]) -> list[list[tuple]]:
        """Splits length-sorted items into runs of similar length (longest at most
        `MAX_LENGTH_RATIO` x shortest) and at most `max_batch_size` items, so padding
        stays cheap; the runs go to worker threads side by side."""
        buckets: list[list[tuple]] = []
        for entry in ordered:
            current = buckets[-1] if buckets else None
            if (current is None or len(current) >= self.max_batch_size
                    or self.length_of(entry[2]) > MAX_LENGTH_RATIO * max(1, self.length_of(current[0][2]))):
                buckets.append([entry])
            else:
                current.append(entry)
        return buckets

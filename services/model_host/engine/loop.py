"""`DecoderEngine`: one loaded decoder's scheduler loop, on its own thread.

Every iteration: run one queued job (a Score, say: model work that is not a generation),
admit new sequences and drop cancelled ones, then one prefill chunk and one batched
decode step over every decoding sequence (services/model_host/engine/scheduler.py), and
hand each sequence its token. ONNX Runtime, tokenization, chat rendering and sampling all
run here; the asyncio side only moves messages (`generate` yields what this thread
emits, `call` awaits a job's result), so a slow model never delays the event loop, health
checks or another model's streams.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from services.common.errors import InvalidArgument, ServiceError, Unavailable
from services.common.logs import log_event
from services.model_host.answers import GenerationSummary, TokenEvent
from services.model_host.engine.kv_slots import KVSlots, slots_for
from services.model_host.engine.scheduler import Scheduler
from services.model_host.engine.sequence import GenerationRequest, Sequence
from services.model_host.runtimes.decoder import DecoderRuntime
from services.model_host.runtimes.prefix_cache import PrefixCache

log = logging.getLogger("mirador.model_host.engine")


@dataclass(frozen=True)
class EngineSettings:
    max_num_seqs: int = 8  # sequences decoded together (KV slots)
    max_context: int = 1024  # tokens per slot: prompt + answer
    prefill_chunk_tokens: int = 32  # prompt tokens per iteration while others decode
    step_delay_s: float = 0.0  # fault injection only (MIRADOR_INJECT_TOKEN_DELAY): a slow model


class _Done:
    """Sent after a sequence's summary (or error): its stream ends."""


_DONE = _Done()


class DecoderEngine:
    def __init__(self, name: str, runtime: DecoderRuntime, settings: EngineSettings,
                 on_step: Callable[[int], None] | None = None):
        self.name = name
        self.runtime = runtime
        self.settings = settings
        self.slots: KVSlots = slots_for(runtime, settings.max_num_seqs, settings.max_context)
        self.scheduler = Scheduler(settings.max_num_seqs, settings.prefill_chunk_tokens)
        # Shared prompt beginnings (a chat's system turn) by their exact ids, copied into a slot
        # instead of prefilled again; the same chunk computed them, so answers do not change.
        self.prefixes = PrefixCache()
        self.on_step = on_step  # called with each decode step's batch size (metrics)
        self._lock = threading.Condition()
        self._incoming: deque[Sequence] = deque()
        self._cancelled: set[Sequence] = set()
        self._jobs: deque[tuple[Callable[[], Any], Callable[[Any, BaseException | None], None]]] = deque()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"engine {name}", daemon=True)
        self._thread.start()

    @property
    def max_context(self) -> int:
        return self.slots.max_context

    @property
    def reserved_bytes(self) -> int:
        return self.slots.reserved_bytes

    # ------------------------------------------------------------------ asyncio side

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent | GenerationSummary]:
        """Streams one generation; leaving the iteration early (cancel, disconnect) frees its slot."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        sequence = Sequence(request, emit=lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        with self._lock:
            if self._stopping:
                raise Unavailable(f"model `{self.name}` is being unloaded; retry")
            self._incoming.append(sequence)
            self._lock.notify()
        finished = False
        try:
            while True:
                event = await events.get()
                if event is _DONE:
                    finished = True
                    return
                if isinstance(event, BaseException):
                    finished = True
                    raise event
                yield event
        finally:
            if not finished:
                with self._lock:
                    self._cancelled.add(sequence)
                    self._lock.notify()

    async def call(self, fn: Callable[..., Any], *args) -> Any:
        """Runs `fn(*args)` on the engine's thread between two steps; returns its result."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def settle(result: Any, error: BaseException | None) -> None:
            def set_once() -> None:
                if not future.done():
                    future.set_exception(error) if error is not None else future.set_result(result)
            loop.call_soon_threadsafe(set_once)

        with self._lock:
            if self._stopping:
                raise Unavailable(f"model `{self.name}` is being unloaded; retry")
            self._jobs.append((lambda: fn(*args), settle))
            self._lock.notify()
        return await future

    def stop(self) -> None:
        """Ends the loop (the registry unloads only models with no calls in flight)."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
        self._thread.join(timeout=10)

    # ------------------------------------------------------------------ engine thread

    def _run(self) -> None:
        while True:
            with self._lock:
                while not (self._stopping or self._incoming or self._cancelled or self._jobs
                           or self.scheduler.has_work()):
                    self._lock.wait()
                if self._stopping:
                    break
                incoming, self._incoming = list(self._incoming), deque()
                cancelled, self._cancelled = self._cancelled, set()
                job = self._jobs.popleft() if self._jobs else None
            for sequence in cancelled:
                self._leave(sequence)
            for sequence in incoming:
                if sequence not in cancelled:
                    self._admit(sequence)
            if job is not None:
                self._run_job(*job)
            try:
                self._iterate()
            except Exception as exc:  # noqa: BLE001 - a failed step fails its sequences, never the host
                log_event(log, "engine step failed", logging.ERROR, model=self.name, error=str(exc))
                for sequence in [*self.scheduler.prefilling, *self.scheduler.decoding]:
                    self._fail(sequence, Unavailable(f"model `{self.name}` failed while generating: {exc}"))
        unloaded = Unavailable(f"model `{self.name}` was unloaded while working; retry")
        for sequence in [*self.scheduler.waiting, *self.scheduler.prefilling, *self.scheduler.decoding, *self._incoming]:
            self._fail(sequence, unloaded)
        for _, settle in self._jobs:
            settle(None, unloaded)

    def _run_job(self, fn: Callable[[], Any], settle: Callable[[Any, BaseException | None], None]) -> None:
        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            settle(None, exc)
        else:
            settle(result, None)

    def _admit(self, sequence: Sequence) -> None:
        try:
            sequence.start(self.runtime, self.max_context)
        except ServiceError as exc:
            sequence.emit(exc)
            return
        except Exception as exc:  # noqa: BLE001 - a prompt the tokenizer cannot take
            sequence.emit(InvalidArgument(f"the prompt cannot be tokenized: {exc}"))
            return
        self.scheduler.add(sequence)

    def _iterate(self) -> None:
        plan = self.scheduler.plan()
        if plan.prefill is not None:
            sequence, first, end = plan.prefill
            if first == 0:
                sequence.prefill_started = time.perf_counter()
                first, end = self._take_shared_beginning(sequence, end)
            logits = self.slots.prefill(sequence.slot, sequence.prompt_ids[first:end], first)
            if end == sequence.shared_prefix and self.slots.copies_prefixes:
                self.prefixes.put(sequence.prompt_ids[:end], self.slots.copy_out(sequence.slot, end))
            if self.scheduler.prefilled(sequence, end):
                sequence.length = len(sequence.prompt_ids)
                if sequence.accept(logits):
                    self._complete(sequence)
        if plan.decode:
            if self.settings.step_delay_s:
                time.sleep(self.settings.step_delay_s)
            logits = self.slots.decode([s.slot for s in plan.decode], [s.last_token for s in plan.decode],
                                       [s.length for s in plan.decode])
            if self.on_step is not None:
                self.on_step(len(plan.decode))
            for sequence, row in zip(plan.decode, logits):
                sequence.length += 1
                if sequence.accept(row):
                    self._complete(sequence)

    def _take_shared_beginning(self, sequence: Sequence, end: int) -> tuple[int, int]:
        """The first chunk to run: after the shared beginning when the cache has it (copied into
        the sequence's slot), else the planned one."""
        shared = sequence.shared_prefix
        past = self.prefixes.get(sequence.prompt_ids[:shared]) if shared and self.slots.copies_prefixes else None
        if past is None:
            return 0, end
        self.slots.copy_in(sequence.slot, past, shared)
        self.scheduler.prefilled(sequence, shared)  # never the whole prompt: the last message follows
        return shared, self.scheduler.chunk_end(sequence, shared)

    def _complete(self, sequence: Sequence) -> None:
        self._leave(sequence)
        try:
            sequence.emit(sequence.summary())
        finally:
            sequence.emit(_DONE)

    def _fail(self, sequence: Sequence, error: ServiceError) -> None:
        self._leave(sequence)
        sequence.emit(error)

    def _leave(self, sequence: Sequence) -> None:
        if sequence.slot is not None:
            self.slots.release(sequence.slot)
        self.scheduler.finish(sequence)

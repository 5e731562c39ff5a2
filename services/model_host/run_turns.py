"""Session runs that take turns (`thread_spinning: in_turn`).

ONNX Runtime's intra-op threads run fastest when they spin between a run's operators instead of
sleeping and waking for each of them (hundreds per decode step). Two sessions whose threads spin
at once fight over the same cores, and both slow down more than they gained. With `in_turn`, a
model host's sessions run one at a time, in the order they asked, each with every core and its
threads spinning until its run ends (session.force_spinning_stop), so one stream gets the speed of
an idle machine and several models still share the cores without a spinning fight.

A turn is one `run` or `run_with_iobinding`: a decode step, a prefill chunk, an Embed batch, or a
Score's prompt and its options. The engines prefill long prompts in `prefill_chunk_tokens` chunks, so
a joining prompt never holds the others for long; a Score's prompt or a big Embed batch is one run
and holds the turn for all of it (the price of turns: with `off` they would run beside the others).
"""

from __future__ import annotations

import collections
import contextlib
import math
import threading
import time
from typing import Callable, Iterator

import onnxruntime as ort

# How far back busy_share looks (the time constant of its exponential average, seconds).
BUSY_SHARE_TAU_S = 2.0


class RunTurns:
    """A first-come, first-served turn for every session of the process. The turn is handed to
    the oldest waiter when a run ends, so a thread that runs step after step (an engine's loop)
    cannot take it again ahead of a thread that was already waiting.

    Since every run passes here, the turns also know how busy the cores are: `busy_share()` is the
    share of the last seconds during which some run held the turn."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._waiting: collections.deque[threading.Event] = collections.deque()
        self._busy = False
        self._clock = clock
        self._share, self._share_at = 0.0, clock()

    @contextlib.contextmanager
    def turn(self) -> Iterator[None]:
        with self._lock:
            ticket = None
            if self._busy:
                ticket = threading.Event()
                self._waiting.append(ticket)
            else:
                self._set_busy(True)
        if ticket is not None:
            ticket.wait()  # set by the run before ours: the turn is ours, _busy stays True
        try:
            yield
        finally:
            with self._lock:
                if self._waiting:
                    self._waiting.popleft().set()
                else:
                    self._set_busy(False)

    def busy_share(self) -> float:
        """The exponentially weighted share of time (time constant BUSY_SHARE_TAU_S) that a run held the turn."""
        with self._lock:
            return self._share_now(self._clock())

    def _share_now(self, now: float) -> float:
        kept = math.exp(-max(0.0, now - self._share_at) / BUSY_SHARE_TAU_S)
        return self._share * kept + (1.0 - kept) * (1.0 if self._busy else 0.0)

    def _set_busy(self, busy: bool) -> None:  # under the lock, when the turn goes from free to held or back
        now = self._clock()
        self._share, self._share_at, self._busy = self._share_now(now), now, busy


PROCESS_TURNS = RunTurns()


class TurnTakingSession:
    """An InferenceSession whose runs wait for their turn; everything else is the session's own."""

    def __init__(self, session: ort.InferenceSession, turns: RunTurns = PROCESS_TURNS) -> None:
        self._session = session
        self._turns = turns

    def run(self, *args, **kwargs):
        with self._turns.turn():
            return self._session.run(*args, **kwargs)

    def run_with_iobinding(self, *args, **kwargs):
        with self._turns.turn():
            return self._session.run_with_iobinding(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._session, name)

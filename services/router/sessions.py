"""Conversations kept by the router, so context survives when a later turn is
answered by a different model. Bounded: per session (turns and characters),
in number of sessions (least recently used goes first) and in time (TTL)."""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

from services.common.errors import InvalidArgument

MAX_SESSION_ID_LENGTH = 128


@dataclass
class Session:
    turns: list[tuple[str, str]] = field(default_factory=list)  # (role, content)
    last_used: float = 0.0


class SessionStore:
    def __init__(self, ttl_s: float = 1800.0, max_sessions: int = 10_000, max_turns: int = 20,
                 max_chars: int = 16_000, clock: Callable[[], float] = time.monotonic):
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self.max_turns = max_turns
        self.max_chars = max_chars
        self.clock = clock
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    @staticmethod
    def validate_id(session_id: str) -> None:
        if len(session_id) > MAX_SESSION_ID_LENGTH or not session_id.isprintable():
            raise InvalidArgument(f"`session_id` must be at most {MAX_SESSION_ID_LENGTH} printable characters")

    def history(self, session_id: str) -> list[tuple[str, str]]:
        self._expire()
        session = self._sessions.get(session_id)
        return list(session.turns) if session else []

    def record(self, session_id: str, user: str, assistant: str) -> None:
        session = self._sessions.pop(session_id, None) or Session()
        session.turns += [("user", user), ("assistant", assistant)]
        session.turns = session.turns[-self.max_turns :]
        while sum(len(content) for _, content in session.turns) > self.max_chars and len(session.turns) > 2:
            session.turns = session.turns[2:]  # drop the oldest exchange
        session.last_used = self.clock()
        self._sessions[session_id] = session
        while len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)

    def _expire(self) -> None:
        cutoff = self.clock() - self.ttl_s
        while self._sessions and next(iter(self._sessions.values())).last_used < cutoff:
            self._sessions.popitem(last=False)

    def __len__(self) -> int:
        return len(self._sessions)

"""Conversations kept by the router, so context survives when a later turn is
answered by a different model. Bounded: per session (turns and characters),
in number of sessions (least recently used goes first) and in time (TTL).

In process by default (`SessionStore`); in Redis when `state.redis_url` is set
(`RedisSessionStore`), so every router replica continues every session."""

from __future__ import annotations

import contextvars
import json
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

from services.common.errors import InvalidArgument
from services.router.redis_link import RedisDown, RedisLink

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

    def warning(self) -> str:
        """Why this call's history is missing, for the summary ("" when nothing is missing)."""
        return ""


# The current call's reason for answering without its session's history (contextvars follow
# the call's task, so concurrent calls never see each other's).
_HISTORY_MISSING: contextvars.ContextVar[str] = contextvars.ContextVar("session_history_missing", default="")

# Appends one exchange and applies the same bounds as SessionStore.record, atomically (two
# replicas recording turns of one session at once both keep theirs). Turns are
# [role, content, characters]: Lua counts bytes, the bound counts characters.
_RECORD = """
local raw = redis.call('GET', KEYS[1])
local turns = {}
if raw then turns = cjson.decode(raw) end
table.insert(turns, {'user', ARGV[1], tonumber(ARGV[2])})
table.insert(turns, {'assistant', ARGV[3], tonumber(ARGV[4])})
local max_turns, max_chars = tonumber(ARGV[5]), tonumber(ARGV[6])
while #turns > max_turns do table.remove(turns, 1) end
local chars = 0
for _, turn in ipairs(turns) do chars = chars + turn[3] end
while chars > max_chars and #turns > 2 do
  chars = chars - turns[1][3] - turns[2][3]
  table.remove(turns, 1)
  table.remove(turns, 1)
end
redis.call('SET', KEYS[1], cjson.encode(turns), 'PX', ARGV[7])
return #turns
"""


class RedisSessionStore(SessionStore):
    """Sessions in Redis (`state.redis_url`), so any router replica continues any session:
    one key per session holding its bounded turns as JSON, expiring `ttl_s` after its last
    turn (the number of sessions is bounded by that TTL and Redis's own memory policy).
    Redis unavailable: the call is answered without history, and `warning()` says why."""

    def __init__(self, link: RedisLink, ttl_s: float = 1800.0, max_turns: int = 20, max_chars: int = 16_000):
        super().__init__(ttl_s=ttl_s, max_turns=max_turns, max_chars=max_chars)
        self.link = link
        self._record = link.script(_RECORD)

    def _key(self, session_id: str) -> str:
        return self.link.key("session", session_id)

    def history(self, session_id: str) -> list[tuple[str, str]]:
        _HISTORY_MISSING.set("")
        try:
            raw = self.link.call("sessions", lambda client: client.get(self._key(session_id)))
        except RedisDown as down:
            self.link.count_unavailable("sessions", "answered_without_history")
            _HISTORY_MISSING.set(f"answered without the session's earlier turns: {down}")
            return []
        try:
            turns = json.loads(raw) if raw else []
            return [(str(role), str(content)) for role, content, *_ in turns] if isinstance(turns, list) else []
        except (ValueError, TypeError):  # not ours (a stray key under our prefix): start afresh
            return []

    def record(self, session_id: str, user: str, assistant: str) -> None:
        try:
            self.link.call("sessions", lambda client: self._record(
                keys=[self._key(session_id)],
                args=[user, len(user), assistant, len(assistant), self.max_turns, self.max_chars,
                      max(1, int(self.ttl_s * 1000))], client=client))
        except RedisDown:
            self.link.count_unavailable("sessions", "turn_not_recorded")

    def warning(self) -> str:
        return _HISTORY_MISSING.get()

    def __len__(self) -> int:
        try:
            return sum(1 for _ in self.link.call("sessions", lambda client: list(
                client.scan_iter(match=self._key("*"), count=1000))))
        except RedisDown:
            return 0

"""Conversations kept by the router, so context survives when a later turn is
answered by a different model. Bounded: per session (turns and characters),
in number of sessions (least recently used goes first) and in time (TTL).

In process by default (`SessionStore`); in Redis when `state.redis_url` is set
(`RedisSessionStore`), so every router replica continues every session.

A session belongs to the caller that started it (its identity, services/router/identity.py):
another caller naming the same id is refused with PERMISSION_DENIED, never shown its turns."""

from __future__ import annotations

import contextvars
import json
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

from services.common.errors import InvalidArgument, PermissionDenied
from services.router.redis_link import RedisDown, RedisLink

MAX_SESSION_ID_LENGTH = 128


@dataclass
class Session:
    turns: list[tuple[str, str]] = field(default_factory=list)  # (role, content)
    last_used: float = 0.0
    owner: str = ""  # the identity of the caller that started it


def not_yours(session_id: str) -> PermissionDenied:
    return PermissionDenied(
        f"session `{session_id}` was started by another client: a session belongs to the client that started it "
        "(its bearer token, or its address without one) and no other can read or continue it; start a session "
        "with a new `session_id`")


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

    def history(self, session_id: str, owner: str = "") -> list[tuple[str, str]]:
        """The session's turns; PermissionDenied when another caller (`owner`) started it."""
        self._expire()
        session = self._sessions.get(session_id)
        if session is not None and session.owner != owner:
            raise not_yours(session_id)
        return list(session.turns) if session else []

    def record(self, session_id: str, user: str, assistant: str, owner: str = "") -> None:
        """Appends one exchange; a session another caller started in the meantime is left alone."""
        session = self._sessions.get(session_id)
        if session is not None and session.owner != owner:
            return
        session = self._sessions.pop(session_id, None) or Session(owner=owner)
        session.turns += [("user", user), ("assistant", assistant)]
        session.turns = session.turns[-self.max_turns :]
        while sum(len(content) for _, content in session.turns) > self.max_chars and len(session.turns) > 2:
            session.turns = session.turns[2:]  # drop the oldest exchange
        session.last_used = self.clock()
        self._sessions[session_id] = session
        while len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)

    async def history_async(self, session_id: str, owner: str = "") -> list[tuple[str, str]]:
        """`history`, for the servicer's event loop (in process it touches only memory)."""
        return self.history(session_id, owner)

    async def record_async(self, session_id: str, user: str, assistant: str, owner: str = "") -> None:
        self.record(session_id, user, assistant, owner)

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
# replicas recording turns of one session at once both keep theirs). The value is
# {owner, turns}; turns are [role, content, characters]: Lua counts bytes, the bound counts
# characters. A session another caller owns is left alone (returns -1).
_RECORD = """
local raw = redis.call('GET', KEYS[1])
local turns = {}
if raw then
  local ok, stored = pcall(cjson.decode, raw)
  if ok and type(stored) == 'table' and stored.owner ~= nil then
    if stored.owner ~= ARGV[8] then return -1 end
    if type(stored.turns) == 'table' then turns = stored.turns end
  end
end
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
redis.call('SET', KEYS[1], cjson.encode({owner = ARGV[8], turns = turns}), 'PX', ARGV[7])
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

    def history(self, session_id: str, owner: str = "") -> list[tuple[str, str]]:
        turns, missing = self._read(session_id, owner)
        _HISTORY_MISSING.set(missing)
        return turns

    async def history_async(self, session_id: str, owner: str = "") -> list[tuple[str, str]]:
        """`history` with the Redis round trip on the link's threads, never on the event loop."""
        turns, missing = await self.link.run(self._read, session_id, owner)
        _HISTORY_MISSING.set(missing)  # set here, in the call's own context, for warning()
        return turns

    async def record_async(self, session_id: str, user: str, assistant: str, owner: str = "") -> None:
        await self.link.run(self.record, session_id, user, assistant, owner)

    def _read(self, session_id: str, owner: str) -> tuple[list[tuple[str, str]], str]:
        """(the session's turns, why they are missing: "" unless Redis could not be read)."""
        try:
            raw = self.link.call("sessions", lambda client: client.get(self._key(session_id)))
        except RedisDown as down:
            self.link.count_unavailable("sessions", "answered_without_history")
            return [], f"answered without the session's earlier turns: {down}"
        try:
            stored = json.loads(raw) if raw else {}
        except ValueError:  # not ours (a stray key under our prefix): start afresh
            return [], ""
        if not isinstance(stored, dict) or "owner" not in stored:  # not ours, or an older format: start afresh
            return [], ""
        if stored["owner"] != owner:
            raise not_yours(session_id)
        try:
            return [(str(role), str(content)) for role, content, *_ in stored.get("turns") or []], ""
        except (ValueError, TypeError):
            return [], ""

    def record(self, session_id: str, user: str, assistant: str, owner: str = "") -> None:
        try:
            self.link.call("sessions", lambda client: self._record(
                keys=[self._key(session_id)],
                args=[user, len(user), assistant, len(assistant), self.max_turns, self.max_chars,
                      max(1, int(self.ttl_s * 1000)), owner], client=client))
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

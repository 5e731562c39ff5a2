"""Rollout windows that every router replica fills together (`state.redis_url`).

Without Redis each router judges a rollout on the calls it saw itself, so with N replicas a
candidate is judged on 1/N of its traffic and `min_calls` counts per replica. With Redis each
window (the candidate's last calls, the stable version's first-token times, the compared
answers) is one Redis list per candidate, `<prefix>rollout:<MODEL@VERSION>:<kind>`: a replica
appends its call and reads the whole window back in one Lua script, then judges that, so
every replica sees the same window and the first to find a limit crossed rolls back for all
(the decision itself is shared through PostgreSQL or adopted as before).

Redis unavailable: the call is judged on this replica's own window (counted in
`mirador_state_redis_unavailable_total{use="rollouts"}`). The round trip never runs on the
event loop: `Rollouts.record` hands it to the Redis link's threads.
"""

from __future__ import annotations

import json
from typing import Any

from services.router.redis_link import RedisDown, RedisLink

WINDOW_TTL_S = 7 * 86_400  # an idle rollout's windows go away after a week

# Appends one entry, keeps the last ARGV[2], returns the push's sequence number (KEYS[2]) and the
# window oldest first. Replicas judge on their Redis link's threads, so replies can come back out
# of order: the sequence number lets a replica keep the newest window it has seen.
_PUSH = """
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[2]), -1)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
local seq = redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return {seq, redis.call('LRANGE', KEYS[1], 0, -1)}
"""


class SharedWindows:
    def __init__(self, link: RedisLink):
        self.link = link
        self._push = link.script(_PUSH)

    def push(self, candidate: str, kind: str, entry: Any, window: int) -> tuple[int, list[Any]] | None:
        """Appends `entry` to the shared window; returns the push's sequence number (it grows with
        every push to this window) and the window (entries as JSON values), or None when Redis
        cannot be used now (the caller keeps its own window)."""
        key = self.link.key("rollout", candidate, kind)
        try:
            seq, raw = self.link.call("rollouts", lambda client: self._push(
                keys=[key, key + ":seq"], args=[json.dumps(entry), window, WINDOW_TTL_S * 1000], client=client))
        except RedisDown:
            self.link.count_unavailable("rollouts", "judged_on_own_calls")
            return None
        entries = []
        for item in raw or ():
            try:
                entries.append(json.loads(item))
            except ValueError:  # not ours (a stray value under our prefix)
                continue
        return int(seq), entries

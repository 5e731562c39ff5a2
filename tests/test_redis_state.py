"""Router sessions and rate limits in Redis (`state.redis_url`), against the real Redis on
127.0.0.1:6379 with a key prefix per test: the same session tests as the in-process store,
two "replicas" (two stores, two limiters) sharing one Redis, atomic appends, and what
happens when Redis is not there: sessions answer without history and say so, rate limits
fail open or closed as configured, a metric and one log line, never an exception."""

from __future__ import annotations

import logging
import threading
import time

import pytest
from prometheus_client import REGISTRY

from services.common.errors import PermissionDenied, ResourceExhausted, Unavailable
from services.common.state_settings import StateSettings
from services.router.rate_limit import RateLimiter, RedisRateLimiter
from services.router.redis_link import RedisLink
from services.router.sessions import RedisSessionStore, SessionStore
from state_servers import REDIS_URL, redis_prefix, require_redis  # noqa: F401

NOWHERE = "redis://127.0.0.1:1/0"  # nothing listens on port 1


def link(prefix: str, url: str = REDIS_URL, **overrides) -> RedisLink:
    return RedisLink(StateSettings(redis_url=url, redis_prefix=prefix, **overrides))


def unavailable(use: str, outcome: str) -> float:
    return REGISTRY.get_sample_value("mirador_state_redis_unavailable_total", {"use": use, "outcome": outcome}) or 0.0


@pytest.fixture(params=["in-process", "redis"])
def sessions(request):
    """A factory of session stores of one backend; two stores of the redis backend share one prefix."""
    if request.param == "in-process":
        shared = SessionStore(max_turns=6, max_chars=100)
        yield lambda: shared
        return
    require_redis()
    prefix = request.getfixturevalue("redis_prefix")
    yield lambda: RedisSessionStore(link(prefix), max_turns=6, max_chars=100)


# --------------------------------------------------------------------------- sessions, both backends


def test_a_session_keeps_its_turns_in_order(sessions):
    store = sessions()
    assert store.history("s-1") == [] and store.warning() == ""
    store.record("s-1", "hello", "hi there")
    store.record("s-1", "how are you?", "fine")
    assert store.history("s-1") == [("user", "hello"), ("assistant", "hi there"),
                                     ("user", "how are you?"), ("assistant", "fine")]
    assert store.history("s-2") == []


def test_a_session_belongs_to_the_caller_that_started_it(sessions):
    store, other_replica = sessions(), sessions()
    store.record("mine", "my pin is 1234", "noted", "alice")
    for reader in (store, other_replica):
        assert reader.history("mine", "alice") == [("user", "my pin is 1234"), ("assistant", "noted")]
        with pytest.raises(PermissionDenied) as refused:
            reader.history("mine", "bob")
        assert "session `mine` was started by another client" in refused.value.message
        assert "1234" not in refused.value.message
    other_replica.record("mine", "injected", "turn", "bob")  # another caller's turn is not recorded
    assert [content for _, content in store.history("mine", "alice")] == ["my pin is 1234", "noted"]


def test_a_session_is_bounded_in_turns_and_characters(sessions):
    store = sessions()
    for i in range(5):
        store.record("s", f"q{i}", f"a{i}")
    assert [content for _, content in store.history("s")] == ["q2", "a2", "q3", "a3", "q4", "a4"]  # max_turns 6
    store.record("long", "x" * 60, "y" * 30)
    store.record("long", "ü" * 20, "z")  # 111 characters > 100: the oldest exchange goes
    assert store.history("long") == [("user", "ü" * 20), ("assistant", "z")]


def test_odd_session_ids_are_kept_apart(sessions):
    store = sessions()
    ids = ["s:1", "s*", "s:*", "ünï ☃", "s\\x00", "s" * 128, "[a-z]", "?"]
    for index, session_id in enumerate(ids):
        store.record(session_id, f"q{index}", f"a{index}")
    for index, session_id in enumerate(ids):
        assert store.history(session_id) == [("user", f"q{index}"), ("assistant", f"a{index}")]


# --------------------------------------------------------------------------- sessions in Redis


def test_any_replica_continues_any_session(redis_prefix):
    first, second = RedisSessionStore(link(redis_prefix)), RedisSessionStore(link(redis_prefix))
    first.record("s", "hello", "hi")
    second.record("s", "and then?", "then this")
    assert first.history("s") == second.history("s") == [
        ("user", "hello"), ("assistant", "hi"), ("user", "and then?"), ("assistant", "then this")]


def test_replicas_recording_one_session_at_once_lose_no_turn(redis_prefix):
    stores = [RedisSessionStore(link(redis_prefix), max_turns=1000, max_chars=100_000) for _ in range(2)]
    barrier = threading.Barrier(8)

    def talk(index):
        barrier.wait()
        for n in range(10):
            stores[index % 2].record("busy", f"q{index}-{n}", f"a{index}-{n}")

    threads = [threading.Thread(target=talk, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    turns = stores[0].history("busy")
    assert len(turns) == 160 and {c for _, c in turns if c.startswith("q")} == {
        f"q{i}-{n}" for i in range(8) for n in range(10)}
    pairs = list(zip(turns[::2], turns[1::2]))
    assert all(q[1][1:] == a[1][1:] for q, a in pairs)  # each exchange stays whole


def test_a_session_expires_its_ttl_after_its_last_turn(redis_prefix):
    store = RedisSessionStore(link(redis_prefix), ttl_s=0.5)
    store.record("s", "hello", "hi")
    assert store.history("s")
    time.sleep(0.8)
    assert store.history("s") == []


def test_a_flushed_redis_starts_the_session_afresh(redis_prefix):
    from state_servers import drop_redis_prefix

    store = RedisSessionStore(link(redis_prefix))
    store.record("s", "hello", "hi")
    drop_redis_prefix(redis_prefix)  # what FLUSHALL does to our keys
    assert store.history("s") == [] and store.warning() == ""
    store.record("s", "again", "ok")
    assert store.history("s") == [("user", "again"), ("assistant", "ok")]


def test_without_redis_a_session_answers_without_history_and_says_why(caplog):
    store = RedisSessionStore(link("x:", NOWHERE, redis_timeout_ms=200))
    before = unavailable("sessions", "answered_without_history")
    with caplog.at_level(logging.WARNING, logger="mirador.router.redis"):
        assert store.history("s") == []
        assert "answered without the session's earlier turns" in store.warning()
        assert "127.0.0.1:1" in store.warning() and "unavailable" in store.warning()
        store.record("s", "hello", "hi")  # not recorded, not raised
        started = time.monotonic()
        assert store.history("s") == []  # within the cooldown: not even tried
        assert time.monotonic() - started < 0.05
    assert unavailable("sessions", "answered_without_history") == before + 2
    assert unavailable("sessions", "turn_not_recorded") >= 1
    assert [r.getMessage() for r in caplog.records].count("redis unavailable: serving without it") == 1


# --------------------------------------------------------------------------- rate limits in Redis


def test_two_replicas_share_one_bucket_per_client(redis_prefix):
    limiters = [RedisRateLimiter(link(redis_prefix), 0.01, burst=3) for _ in range(2)]
    admitted = 0
    for i in range(6):
        try:
            limiters[i % 2].check("client-a")
            admitted += 1
        except ResourceExhausted as refused:
            assert "client `client-a` is over its rate limit of 0.01 requests/s (burst 3" in refused.message
            assert refused.retry_after_ms > 1000
    assert admitted == 3  # the burst, once, for both replicas together
    limiters[0].check("client-b")  # another client has its own bucket


def test_a_rate_holds_for_two_replicas_together(redis_prefix):
    """Two limiters (two router replicas) hammered from four threads for 2 s at 20/s, burst 5:
    together they admit what one would (5 + 20 per second), within 10 %. (A burst of 5 keeps a
    thread stalled for up to 250 ms on a loaded machine from losing tokens the bucket would cap.)"""
    limiters = [RedisRateLimiter(link(redis_prefix), 20.0, burst=5) for _ in range(2)]
    admitted, stop = [], threading.Event()

    def hammer(index):
        while not stop.is_set():
            try:
                limiters[index % 2].check("shared")
                admitted.append(1)
            except ResourceExhausted:
                pass
            time.sleep(0.002)

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(4)]
    started = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(2.0)
    stop.set()
    stopped = time.monotonic()
    for t in threads:
        t.join(10)
    ended = time.monotonic()  # calls in flight at the stop end by here; on a loaded machine, a while later
    at_least, at_most = 5 + 20.0 * (stopped - started), 5 + 20.0 * (ended - started)
    assert 0.9 * at_least <= len(admitted) <= 1.1 * at_most, (len(admitted), at_least, at_most)


def test_without_redis_rate_limits_fail_open_or_closed_as_configured():
    before_open, before_closed = unavailable("rate_limit", "admitted"), unavailable("rate_limit", "refused")
    open_ = RedisRateLimiter(link("x:", NOWHERE, redis_timeout_ms=100), 1.0, burst=1)
    for _ in range(5):
        open_.check("c")  # admitted, every time
    closed = RedisRateLimiter(link("x:", NOWHERE, redis_timeout_ms=100), 1.0, burst=1, fail_open=False)
    with pytest.raises(Unavailable, match="rate_limit_without_redis is `closed`") as refused:
        closed.check("c")
    assert "127.0.0.1:1" in refused.value.message
    assert unavailable("rate_limit", "admitted") == before_open + 5
    assert unavailable("rate_limit", "refused") == before_closed + 1


def test_a_limiter_that_redis_comes_back_to_counts_again(redis_prefix):
    clock = [0.0]
    shared = link(redis_prefix)
    shared.clock = lambda: clock[0]
    limiter = RedisRateLimiter(shared, 0.01, burst=1)
    real = shared.client
    shared.client = link(redis_prefix, NOWHERE, redis_timeout_ms=100).client
    limiter.check("c")  # down: admitted (open)
    shared.client = real
    limiter.check("c")  # still in the cooldown: admitted without asking
    clock[0] += 2.0
    limiter.check("c")  # back: the bucket's one token
    with pytest.raises(ResourceExhausted):
        limiter.check("c")


def test_the_in_process_limiter_is_unchanged():
    limiter = RateLimiter(1.0, burst=1, clock=lambda: 0.0)
    limiter.check("c")
    with pytest.raises(ResourceExhausted):
        limiter.check("c")


# --------------------------------------------------------------------------- rollout windows, shared


def _rollout_replicas(tmp_path, windows_for):
    """Two routers' Rollouts of one candidate (min_calls 4, max_error_rate 0.5), each with the
    windows `windows_for(index)` gives (None = judged on its own calls)."""
    from conftest import write_config
    from services.common.config import load_config
    from services.router.rollouts import RolloutStateFile, Rollouts

    body = ('fleet:\n  lm:\n    task: text-generation\n    version: "1"\n'
            '    rollout: {version: "2", min_calls: 4, max_error_rate: 0.5, window: 10}\n'
            'routes:\n  chat: {primary: lm}\n')
    config = load_config(write_config(tmp_path, body=body))
    replicas = [Rollouts(config, RolloutStateFile(tmp_path / f"rollouts-{i}.json")) for i in range(2)]
    for index, replica in enumerate(replicas):
        windows = windows_for(index)
        if windows is not None:
            replica.share_windows(windows)
    return replicas


def _wait_for(predicate, timeout_s=5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_two_routers_fill_one_rollout_window_and_either_rolls_back_for_both_calls(redis_prefix, tmp_path):
    from services.router.rollout_windows import SharedWindows
    from services.router.rollouts import Outcome, State

    shared = SharedWindows(link(redis_prefix))
    a, b = _rollout_replicas(tmp_path, lambda index: shared)
    for replica in (a, b, a, b):  # two failed candidate calls each: 4 in the shared window
        replica.record("lm@2", Outcome.FAILED)
    # The pushes run on the Redis link's threads, so either replica may push the 4th call: that
    # one, and only that one, rolls back (the other adopts it through the shared decisions in
    # PostgreSQL, not here).
    rolled_back = lambda: [r for r in (a, b) if r.get("lm").state == State.ROLLED_BACK]
    assert _wait_for(lambda: rolled_back()), (a.get("lm").window(), b.get("lm").window())
    time.sleep(0.2)  # let any late judgement land
    [judge] = rolled_back()
    other = b if judge is a else a
    assert "over the candidate's last 4 calls" in judge.get("lm").reason
    assert judge.get("lm").window().candidate_calls == 4
    assert other.get("lm").state == State.ACTIVE


def test_a_late_reply_with_an_older_shared_window_does_not_replace_a_newer_one(redis_prefix, tmp_path):
    """Replies to concurrent pushes come back in any order; the push that completed the window
    is judged on it, and an older window arriving after it is not taken."""
    from services.router.rollout_windows import SharedWindows
    from services.router.rollouts import Outcome, State

    class Reordered(SharedWindows):  # hands back the 3rd push's reply only after the 4th's
        held = None

        def push(self, candidate, kind, entry, window):
            reply = super().push(candidate, kind, entry, window)
            if reply[0] == 3:
                self.held = reply
                return push_4th_then(reply)
            return reply

    shared = Reordered(link(redis_prefix))
    [a] = _rollout_replicas(tmp_path, lambda index: shared)[:1]
    rollout = a.get("lm")

    def push_4th_then(reply):
        assert rollout.record("lm@2", Outcome.FAILED, None) is not None  # the 4th push: 4 calls, rolled back
        return reply

    for _ in range(3):
        rollout.record("lm@2", Outcome.FAILED, None)
    assert rollout.state == State.ROLLED_BACK
    assert rollout.window().candidate_calls == 4  # not the late 3-call window


def test_without_shared_windows_each_router_judges_only_its_own_calls(tmp_path):
    from services.router.rollouts import Outcome, State

    a, b = _rollout_replicas(tmp_path, lambda index: None)
    for replica in (a, b, a, b):
        replica.record("lm@2", Outcome.FAILED)
    assert a.get("lm").state == b.get("lm").state == State.ACTIVE  # 2 calls each: below min_calls
    assert a.get("lm").window().candidate_calls == 2


def test_with_redis_down_a_router_judges_its_own_calls(tmp_path):
    from services.router.rollout_windows import SharedWindows
    from services.router.rollouts import Outcome, State

    before = unavailable("rollouts", "judged_on_own_calls")
    (a, _) = _rollout_replicas(tmp_path, lambda index: SharedWindows(link("x:", url=NOWHERE, redis_timeout_ms=100)))
    for _ in range(4):
        a.record("lm@2", Outcome.FAILED)
    assert _wait_for(lambda: a.get("lm").state == State.ROLLED_BACK)
    assert unavailable("rollouts", "judged_on_own_calls") >= before + 1

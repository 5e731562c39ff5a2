"""Versioned rollouts: which version of a model answers a request, and when a
candidate version is rolled back.

A fleet model with `rollout:` in the config has a stable version (its pinned
`version:`) and a candidate, served by the model host as `MODEL@VERSION`.
While the rollout is active, a canary candidate answers `share` of the model's
requests (the stable version answers if it fails before its first token), and
a shadow candidate gets a copy of `share` of them whose answer is only compared.
The candidate's last `window` calls are judged against the config's limits —
error rate, median time to first token against the stable version's, and
disagreement with the stable version's answers — and the first limit crossed
rolls the model back to its stable version, with the reason recorded. Rolled
back and promoted states are written to a small JSON file, so a restarted
router keeps them; promotion is only ever an operator's decision.

One router process judges its own traffic, unless `state.redis_url` is set: then every
replica fills and judges the same windows (rollout_windows.py). With `state.database_url`
the decisions live in PostgreSQL (rollout_store_pg.py) and every replica adopts the others'
(`adopt`), so a rollback or a promotion holds for all of them.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import random
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mirador.v1 import rollouts_pb2 as pb
from prometheus_client import Counter, Gauge

from services.common.config import ConfigError, ConfigProblem, MiradorConfig, RolloutSpec, candidate_name
from services.common.errors import FailedPrecondition, NotFound, ServiceError
from services.common.logs import log_event
from services.common.paths import state_file

if TYPE_CHECKING:
    from services.router.rollout_windows import SharedWindows

log = logging.getLogger("mirador.router.rollouts")

ROLLOUT_STATE = Gauge("mirador_rollout_state", "1 for the state each rollout is in (active, rolled_back, promoted)",
                      ["model", "candidate", "state"])
ROLLOUT_CALLS = Counter("mirador_rollout_calls", "Calls judged by rollouts, by version role and outcome",
                        ["model", "role", "outcome"])
ROLLBACKS = Counter("mirador_rollout_rollbacks", "Rollouts rolled back, by what crossed its limit", ["model", "cause"])

# Two answers "agree" when this share of their words match in order (difflib's ratio).
AGREEMENT_SIMILARITY = 0.5
MAX_REASON_CHARS = 1024


class Outcome:
    OK = "ok"
    FAILED = "failed"
    IGNORED = "ignored"  # busy (RESOURCE_EXHAUSTED) or cancelled by the caller: says nothing of the version
    SHED = "shed"  # a mirrored call not sent because too many were in flight


class State:
    ACTIVE = "active"
    ROLLED_BACK = "rolled_back"
    PROMOTED = "promoted"


_STATE_PB = {State.ACTIVE: pb.ROLLOUT_STATE_ACTIVE, State.ROLLED_BACK: pb.ROLLOUT_STATE_ROLLED_BACK,
             State.PROMOTED: pb.ROLLOUT_STATE_PROMOTED}
_MODE_PB = {"canary": pb.ROLLOUT_MODE_CANARY, "shadow": pb.ROLLOUT_MODE_SHADOW}


@dataclass(frozen=True)
class Plan:
    """Who handles one request for a model: `answer` answers; `mirror`, if set, gets the
    same request in the background and its answer is compared with `answer`'s."""

    answer: str
    mirror: str | None = None


def answers_disagree(a: str, b: str) -> bool:
    """Word-level similarity (difflib's ratio) below AGREEMENT_SIMILARITY."""
    return difflib.SequenceMatcher(None, a.split(), b.split(), autojunk=False).ratio() < AGREEMENT_SIMILARITY


class RolloutStateFile:
    """Decisions that outlive the process: {"MODEL@VERSION": {"state", "reason", "changed_at"}}."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()

    def load(self) -> dict[str, dict]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log_event(log, "rollout state file unreadable; starting every rollout active", logging.ERROR,
                      path=str(self.path), error=str(exc))
            return {}
        return data if isinstance(data, dict) else {}

    def save(self, key: str, entry: dict) -> None:
        with self._lock:
            data = self.load()
            data[key] = entry
            self.path.parent.mkdir(parents=True, exist_ok=True)
            staging = self.path.with_suffix(".json.tmp")
            staging.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")
            os.replace(staging, self.path)  # readers see the old file or the new one, never half of one


class Rollout:
    def __init__(self, model: str, stable_version: str, spec: RolloutSpec, saved: dict | None,
                 rng: random.Random, clock=time.time, windows: "SharedWindows | None" = None):
        self.model, self.stable_version, self.spec = model, stable_version, spec
        self.candidate = candidate_name(model, spec.version)
        self.rng, self.clock = rng, clock
        self.state, self.reason, self.changed_at = State.ACTIVE, "", None
        if saved and saved.get("state") in (State.ROLLED_BACK, State.PROMOTED):
            self.state, self.reason, self.changed_at = saved["state"], str(saved.get("reason", "")), saved.get("changed_at")
        self.candidate_calls: deque[tuple[bool, float | None]] = deque(maxlen=spec.window)  # (failed, first token ms)
        self.stable_first_token_ms: deque[float] = deque(maxlen=spec.window)
        self.comparisons: deque[bool] = deque(maxlen=spec.window)  # True = disagreed
        self.windows = windows  # shared with the other router replicas (Redis), or None: this router's own
        self._lock = threading.RLock()  # shared windows are judged on the Redis link's threads
        self._seen_seq: dict[str, int] = {}  # per window kind: the newest shared window taken
        self._publish_state()

    # ------------------------------------------------------------------ routing

    def plan(self) -> Plan:
        if self.state == State.PROMOTED:
            return Plan(self.candidate)
        if self.state == State.ROLLED_BACK or self.rng.random() >= self.spec.share:
            return Plan(self.model)
        if self.spec.mode == "shadow":
            return Plan(self.model, mirror=self.candidate)
        return Plan(self.candidate, mirror=self.model if self.spec.max_disagreement is not None else None)

    # ------------------------------------------------------------------ judging

    def record(self, model: str, outcome: str, first_token_ms: float | None) -> str | None:
        """One finished call of either version; returns the rollback reason if this call crossed a limit."""
        role = "candidate" if model == self.candidate else "stable"
        ROLLOUT_CALLS.labels(self.model, role, outcome).inc()
        if outcome in (Outcome.IGNORED, Outcome.SHED) or self.state != State.ACTIVE:
            return None
        if role == "candidate":
            failed = outcome == Outcome.FAILED
            return self._add("calls", self.candidate_calls, [failed, first_token_ms],
                             lambda entries: [(bool(f), ms) for f, ms in entries])
        if outcome == Outcome.OK and first_token_ms is not None:
            return self._add("stable", self.stable_first_token_ms, first_token_ms, list)
        with self._lock:
            return self._judge()

    def compare(self, stable_text: str, candidate_text: str) -> str | None:
        if self.state != State.ACTIVE:
            return None
        disagreed = answers_disagree(stable_text, candidate_text)
        return self._add("comparisons", self.comparisons, disagreed, lambda entries: [bool(d) for d in entries])

    def _add(self, kind: str, window: deque, entry, decode) -> str | None:
        """Adds `entry` to the window of `kind` (the shared one when there is one) and judges.

        The fill and the judgement happen under one lock, and a shared window older than one
        already taken (replies of concurrent pushes come back in any order) is not taken: the
        push that completed a window is judged on it."""
        shared = None if self.windows is None else self.windows.push(self.candidate, kind, entry, self.spec.window)
        with self._lock:
            if shared is None:
                window.append(tuple(entry) if isinstance(entry, list) else entry)
            else:
                seq, entries = shared
                if seq > self._seen_seq.get(kind, 0):
                    self._seen_seq[kind] = seq
                    window.clear()
                    window.extend(decode(entries))
            return self._judge()

    def window(self) -> pb.RolloutWindow:
        with self._lock:
            return self._window()

    def _window(self) -> pb.RolloutWindow:
        calls = len(self.candidate_calls)
        errors = sum(failed for failed, _ in self.candidate_calls)
        candidate_p50 = _median([ms for failed, ms in self.candidate_calls if not failed and ms is not None])
        stable_p50 = _median(list(self.stable_first_token_ms))
        return pb.RolloutWindow(
            candidate_calls=calls, candidate_errors=errors, error_rate=errors / calls if calls else 0.0,
            candidate_p50_ms=candidate_p50, stable_p50_ms=stable_p50,
            latency_ratio=candidate_p50 / stable_p50 if candidate_p50 and stable_p50 else 0.0,
            compared=len(self.comparisons),
            disagreement=sum(self.comparisons) / len(self.comparisons) if self.comparisons else 0.0,
            min_calls=self.spec.min_calls, max_error_rate=self.spec.max_error_rate,
            max_latency_ratio=self.spec.max_latency_ratio, max_disagreement=self.spec.max_disagreement or 0.0,
        )

    def _judge(self) -> str | None:
        w, spec = self.window(), self.spec
        if self.state != State.ACTIVE:  # another thread judged first
            return None
        cause = reason = None
        if w.candidate_calls >= spec.min_calls and w.error_rate > spec.max_error_rate:
            cause, reason = "errors", (f"error rate {w.error_rate:.2f} over the candidate's last {w.candidate_calls} calls "
                                       f"is above max_error_rate {spec.max_error_rate:.2f}")
        elif (w.candidate_calls >= spec.min_calls and len(self.stable_first_token_ms) >= min(spec.min_calls, 3)
              and w.latency_ratio > spec.max_latency_ratio):
            cause, reason = "latency", (f"median time to first token {w.candidate_p50_ms:.0f} ms is {w.latency_ratio:.2f}x "
                                        f"the stable version's {w.stable_p50_ms:.0f} ms, above max_latency_ratio "
                                        f"{spec.max_latency_ratio:.2f}")
        elif (spec.max_disagreement is not None and w.compared >= spec.min_calls
              and w.disagreement > spec.max_disagreement):
            cause, reason = "disagreement", (f"{w.disagreement:.0%} of {w.compared} compared answers differ from the "
                                             f"stable version's, above max_disagreement {spec.max_disagreement:.0%}")
        if reason is None:
            return None
        ROLLBACKS.labels(self.model, cause).inc()
        self._set(State.ROLLED_BACK, f"automatic: {reason}")
        log_event(log, "rollout rolled back", logging.WARNING, model=self.model, candidate=self.candidate, reason=reason)
        return reason

    # ------------------------------------------------------------------ operator actions

    def promote(self, reason: str) -> None:
        if self.state == State.ROLLED_BACK:
            raise FailedPrecondition(
                f"the rollout of `{self.model}` to version {self.spec.version} was rolled back ({self.reason}); "
                "fix the candidate, put it in the repository as a new version and name it in the config")
        self._set(State.PROMOTED, reason or "promoted by an operator")

    def rollback(self, reason: str) -> None:
        self._set(State.ROLLED_BACK, f"operator: {reason or 'rolled back by an operator'}")

    def _set(self, state: str, reason: str) -> None:
        self.state, self.reason = state, reason[:MAX_REASON_CHARS]
        self.changed_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.clock()))
        self._publish_state()

    def _publish_state(self) -> None:
        for state in _STATE_PB:
            ROLLOUT_STATE.labels(self.model, self.candidate, state).set(1 if state == self.state else 0)

    def saved(self) -> dict:
        return {"state": self.state, "reason": self.reason, "changed_at": self.changed_at}

    def describe(self) -> pb.Rollout:
        rollout = pb.Rollout(
            model=self.model, stable_version=self.stable_version, candidate_version=self.spec.version,
            candidate_model=self.candidate, mode=_MODE_PB[self.spec.mode], state=_STATE_PB[self.state],
            share=self.spec.share, reason=self.reason, window=self.window(),
        )
        if self.changed_at:
            rollout.changed_at.FromJsonString(self.changed_at)
        return rollout


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


class Rollouts:
    """Every rollout of the config, by model; kept across config reloads while the
    rollout (model and candidate version) is unchanged."""

    def __init__(self, config: MiradorConfig, state_file: RolloutStateFile, rng: random.Random | None = None):
        self.state_file = state_file
        self.rng = rng or random.Random()
        self.by_model: dict[str, Rollout] = {}
        self.windows: SharedWindows | None = None  # set by share_windows (state.redis_url)
        self.configure(config)

    @classmethod
    def from_config(cls, config: MiradorConfig) -> "Rollouts":
        if config.state.uses_postgresql:
            from services.router.rollout_store_pg import RolloutStateDatabase  # psycopg only when asked for

            state = config.state
            try:
                missing = state.missing_url("database_url")
                if missing:
                    raise ValueError(missing)
                return cls(config, RolloutStateDatabase(state))
            except Exception as exc:  # noqa: BLE001 - unset, unreachable, refused, newer schema: stop, naming the key
                raise ConfigError([ConfigProblem(str(config.path), state.lines.get("database_url", 0),
                                                 state.key_of("database_url"), str(exc))]) from None
        path = state_file(config.services.router.rollout_state, "rollouts.json", config.path.parent)
        return cls(config, RolloutStateFile(path))

    @property
    def shared(self) -> bool:
        """Whether other router replicas write decisions this one should adopt."""
        return not isinstance(self.state_file, RolloutStateFile)

    def adopt(self, saved: dict[str, dict]) -> list[str]:
        """Takes the rolled-back or promoted states another replica saved (`saved` as from
        `state_file.load()`); returns the models whose state changed here."""
        changed = []
        for name, rollout in self.by_model.items():
            entry = saved.get(rollout.candidate) or {}
            state = entry.get("state")
            if state in (State.ROLLED_BACK, State.PROMOTED) and state != rollout.state:
                rollout.state, rollout.reason = state, str(entry.get("reason", ""))[:MAX_REASON_CHARS]
                rollout.changed_at = entry.get("changed_at")
                rollout._publish_state()
                changed.append(name)
                log_event(log, "rollout decision adopted from another router", model=name,
                          candidate=rollout.candidate, state=state, reason=rollout.reason)
        return changed

    def share_windows(self, windows: "SharedWindows") -> None:
        """Judges every rollout on the windows all router replicas fill (rollout_windows.py); the
        Redis round trips of `record` and `compare` then run on the Redis link's threads."""
        self.windows = windows
        for rollout in self.by_model.values():
            rollout.windows = windows

    def configure(self, config: MiradorConfig) -> None:
        saved = self.state_file.load()
        rollouts = {}
        for name, spec in config.fleet.items():
            if spec.rollout is None:
                continue
            current = self.by_model.get(name)
            if current is not None and current.spec == spec.rollout and current.stable_version == spec.version:
                rollouts[name] = current
            else:
                key = candidate_name(name, spec.rollout.version)
                rollouts[name] = Rollout(name, spec.version, spec.rollout, saved.get(key), self.rng,
                                         windows=self.windows)
        self.by_model = rollouts

    def plan(self, model: str) -> Plan:
        rollout = self.by_model.get(model)
        return rollout.plan() if rollout is not None else Plan(model)

    def serving(self, model: str) -> str:
        """The version that answers all traffic that takes no part in the rollout (consensus votes)."""
        rollout = self.by_model.get(model)
        return rollout.candidate if rollout is not None and rollout.state == State.PROMOTED else model

    def owner(self, model: str) -> Rollout | None:
        """The rollout a served model name (stable or candidate) belongs to."""
        for rollout in self.by_model.values():
            if model in (rollout.model, rollout.candidate):
                return rollout
        return None

    def is_candidate(self, model: str) -> bool:
        rollout = self.owner(model)
        return rollout is not None and model == rollout.candidate

    def record(self, model: str, outcome: str, first_token_ms: float | None = None) -> None:
        rollout = self.owner(model)
        if rollout is None:
            return
        if rollout.windows is not None and outcome not in (Outcome.IGNORED, Outcome.SHED):
            rollout.windows.link.submit(self._record, rollout, model, outcome, first_token_ms)  # off the event loop
        else:
            self._record(rollout, model, outcome, first_token_ms)

    def _record(self, rollout: Rollout, model: str, outcome: str, first_token_ms: float | None) -> None:
        if rollout.record(model, outcome, first_token_ms) is not None:
            self._save(rollout)

    def compare(self, model: str, stable_text: str, candidate_text: str) -> None:
        rollout = self.by_model.get(model)
        if rollout is None:
            return
        if rollout.windows is not None:
            rollout.windows.link.submit(self._compare, rollout, stable_text, candidate_text)
        else:
            self._compare(rollout, stable_text, candidate_text)

    def _compare(self, rollout: Rollout, stable_text: str, candidate_text: str) -> None:
        if rollout.compare(stable_text, candidate_text) is not None:
            self._save(rollout)

    def get(self, model: str) -> Rollout:
        try:
            return self.by_model[model]
        except KeyError:
            known = ", ".join(sorted(self.by_model)) or "none"
            raise NotFound(f"model `{model}` has no rollout in the config; models with one: {known}") from None

    def promote(self, model: str, reason: str) -> Rollout:
        rollout = self.get(model)
        rollout.promote(reason)
        self._save(rollout)
        log_event(log, "rollout promoted", model=model, candidate=rollout.candidate, reason=rollout.reason)
        return rollout

    def rollback(self, model: str, reason: str) -> Rollout:
        rollout = self.get(model)
        rollout.rollback(reason)
        self._save(rollout)
        log_event(log, "rollout rolled back by an operator", logging.WARNING, model=model, candidate=rollout.candidate,
                  reason=rollout.reason)
        return rollout

    def _save(self, rollout: Rollout) -> None:
        try:
            self.state_file.save(rollout.candidate, rollout.saved())
        except (OSError, ServiceError) as exc:  # the decision holds in memory: say loudly that a restart loses it
            log_event(log, "cannot write the rollout state file; the decision is kept in memory only", logging.ERROR,
                      path=str(self.state_file.path), error=str(exc))

"""The fixed split of the labelled routing requests: a fit part and a held-out part.
config/mirador.yaml's route examples hold both (the router serves with all it has);
bench/routing.py takes the held-out part out of a copy of the config to measure a real
router on requests it never learned (its classifier comparison cross-validates instead).

Deterministic and stratified: within each route, requests are ordered by the SHA-256 of
their text and the first 60% are for fitting.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "eval" / "routing-dev.jsonl"
FIT_SHARE = 0.6


def load(path: Path = DEFAULT_DATA) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def split(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    by_route: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_route[row["route"]].append(row)
    fit, held_out = [], []
    for route in sorted(by_route):
        ordered = sorted(by_route[route], key=lambda r: hashlib.sha256(r["text"].encode()).hexdigest())
        cut = round(len(ordered) * FIT_SHARE)
        fit += ordered[:cut]
        held_out += ordered[cut:]
    return fit, held_out

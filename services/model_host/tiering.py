"""Which idle models a load may evict, and in what order (`services.model_host.tier_policy`).

- `static` (the default): the configured tiers alone. Hot models are pinned; among the others,
  cold ones go before warm ones, least recently used first. A burst of one-off loads pushes out
  whatever was not used in the last moments, however often it is used.
- `usage`: the most-used models become hot by themselves. Each model's calls are counted with
  exponential decay (`usage_half_life_s`), so the count follows what is used now. A model whose
  decayed count reaches `promote_after_calls` is *promoted* (of the models in memory), the most used
  first, until promoted models would hold more than `promote_share` of the budget (the rest stays
  for everything else). Counts are per host: a model served elsewhere now counts there.
  A promoted model is evicted only after every unpromoted one, and is not unloaded for idleness
  while it stays promoted. Among unpromoted models the least used go first (then the least
  recently used), so a one-off load evicts another one-off rather than a model in steady use. A
  call is counted when it arrives, before any load, so a model loaded for it is not the next victim.
  Evicting by count rather than recency is what keeps a hit rate near the share of calls of the
  models that fit when requests are independent draws from a skewed distribution (Zipf).

The promoted set is recomputed from the counts when it is asked for: a model stops being hot as
its count decays, then falls back to its configured tier's keep_alive.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Protocol

from services.model_host.settings import ModelHostSettings

class Record(Protocol):  # what a policy reads of a ModelRecord
    name: str
    pinned: bool
    last_used: float

    @property
    def spec(self): ...


Size = Callable[[Record], int]


class StaticTiers:
    """The configured tiers: cold before warm, least recently used first."""

    name = "static"

    def record_use(self, name: str, now: float) -> None:
        pass

    def promoted(self, records: Iterable[Record], size: Size, budget_bytes: int, now: float) -> set[str]:
        return set()

    def eviction_order(self, candidates: Iterable[Record], records: Iterable[Record], size: Size,
                       budget_bytes: int, now: float) -> list[Record]:
        return sorted(candidates, key=lambda r: (r.spec.tier != "cold", r.last_used))


class UsageTiers:
    """Decayed call counts; the most used models, within a share of the budget, act as hot."""

    name = "usage"

    def __init__(self, half_life_s: float = 600.0, promote_after_calls: float = 3.0, promote_share: float = 0.75):
        self.decay_per_s = math.log(2) / half_life_s
        self.promote_after_calls = promote_after_calls
        self.promote_share = promote_share
        self._counts: dict[str, tuple[float, float]] = {}  # name -> (count, when it was last updated)

    def count(self, name: str, now: float) -> float:
        count, at = self._counts.get(name, (0.0, now))
        return count * math.exp(-self.decay_per_s * max(0.0, now - at))

    def record_use(self, name: str, now: float) -> None:
        self._counts[name] = (self.count(name, now) + 1.0, now)

    def promoted(self, records: Iterable[Record], size: Size, budget_bytes: int, now: float) -> set[str]:
        used = [(self.count(r.name, now), r) for r in records if not r.pinned]
        room = self.promote_share * budget_bytes if budget_bytes else math.inf
        chosen: set[str] = set()
        for count, record in sorted(used, key=lambda pair: -pair[0]):
            if count < self.promote_after_calls:
                break
            if size(record) <= room:  # a model too big for what is left is skipped; smaller ones may fit
                chosen.add(record.name)
                room -= size(record)
        return chosen

    def eviction_order(self, candidates: Iterable[Record], records: Iterable[Record], size: Size,
                       budget_bytes: int, now: float) -> list[Record]:
        promoted = self.promoted(records, size, budget_bytes, now)
        return sorted(candidates, key=lambda r: (r.name in promoted, self.count(r.name, now), r.last_used))


def tier_policy(settings: ModelHostSettings) -> StaticTiers | UsageTiers:
    if settings.tier_policy == "usage":
        return UsageTiers(settings.usage_half_life_s, settings.promote_after_calls, settings.promote_share)
    return StaticTiers()

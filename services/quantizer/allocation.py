"""Bit allocation: an exact multiple-choice knapsack by dynamic programming.

Each layer picks exactly one option (fp32, 8, 4 or 2 bits) with a cost (bytes, or
nominal bits x weights) and a sensitivity (measured KL; 0 for fp32). We minimise
the total sensitivity with the total cost within the budget.

Costs are discretised on a unit grid (1 KiB for byte budgets). Each option's cost
above the layer's cheapest option is rounded *up* to whole units and the capacity
is rounded *down*, so for any choice the DP accepts

    real total = sum(cheapest) + sum(delta_real)
              <= sum(cheapest) + unit * sum(ceil(delta_real / unit))
              <= sum(cheapest) + unit * floor((budget - sum(cheapest)) / unit)
              <= budget,

i.e. the budget holds exactly on real sizes; the price is at most one unit per
layer of unused room. When every cost is a multiple of the unit the DP is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

MAX_CELLS = 400_000_000  # items x capacity cells the DP may use (int8 choice table)


class BudgetError(ValueError):
    """No choice of options fits the budget."""


@dataclass(frozen=True)
class Option:
    label: object     # what the option stands for (e.g. a tuple of bits, 0 = fp32)
    cost: float       # bytes or bits, real
    penalty: float    # sensitivity (>= 0)


@dataclass(frozen=True)
class Allocation:
    choice: list[int]      # index of the chosen option, per item
    labels: list           # chosen label, per item
    cost: float            # real total cost of the choice
    penalty: float         # total sensitivity
    budget: float
    unit: float


def solve(items: Sequence[Sequence[Option]], budget: float, unit: float | None = None) -> Allocation:
    """Minimise sum of penalties with sum of real costs <= budget (see module doc)."""
    if not items:
        return Allocation([], [], 0.0, 0.0, budget, unit or 1.0)
    base = [min(o.cost for o in options) for options in items]
    floor_cost = float(sum(base))
    if floor_cost > budget:
        raise BudgetError(f"the cheapest choice costs {floor_cost:,.0f}, more than the budget {budget:,.0f}")
    room = budget - floor_cost
    spread = sum(max(o.cost for o in options) - b for options, b in zip(items, base))
    if unit is None:
        unit = 1.0
        while min(room, spread) / unit * len(items) > MAX_CELLS:
            unit *= 2
    capacity = int(math.floor(min(room, spread + unit * len(items)) / unit + 1e-9))
    # Guard against float error in floor(): the proof needs unit * capacity <= room.
    while capacity > 0 and unit * capacity > room:
        capacity -= 1
    width = capacity + 1
    inf = np.inf
    best = np.full(width, inf)
    best[0] = 0.0  # best[c]: least penalty using exactly c units of room (so far)
    choices = np.zeros((len(items), width), dtype=np.int8)
    for i, options in enumerate(items):
        new = np.full(width, inf)
        pick = np.zeros(width, dtype=np.int8)
        for j, option in enumerate(options):
            units = int(math.ceil((option.cost - base[i]) / unit - 1e-12))
            if units > capacity:
                continue
            shifted = np.full(width, inf)
            shifted[units:] = best[: width - units] + option.penalty
            better = shifted < new
            new[better] = shifted[better]
            pick[better] = j
        best = new
        choices[i] = pick
    end = int(np.argmin(best))
    if not np.isfinite(best[end]):
        raise BudgetError("no combination of options fits the budget")
    choice = [0] * len(items)
    c = end
    for i in range(len(items) - 1, -1, -1):
        j = int(choices[i, c])
        choice[i] = j
        c -= int(math.ceil((items[i][j].cost - base[i]) / unit - 1e-12))
    assert c == 0
    cost = float(sum(items[i][j].cost for i, j in enumerate(choice)))
    penalty = float(sum(items[i][j].penalty for i, j in enumerate(choice)))
    assert cost <= budget + 1e-6 * max(1.0, abs(budget)), (cost, budget)
    return Allocation(choice, [items[i][j].label for i, j in enumerate(choice)], cost, penalty, budget, unit)


def brute_force(items: Sequence[Sequence[Option]], budget: float) -> tuple[float, list[int]] | None:
    """Reference solver for tests: every combination."""
    import itertools

    best = None
    for combo in itertools.product(*[range(len(o)) for o in items]):
        cost = sum(items[i][j].cost for i, j in enumerate(combo))
        if cost <= budget:
            penalty = sum(items[i][j].penalty for i, j in enumerate(combo))
            if best is None or penalty < best[0] - 1e-12:
                best = (penalty, list(combo))
    return best

"""Exact Pareto frontier of (cost, Ω) for the diagonal objective: a multiple-choice knapsack DP.

For a separable objective V(c) = Σᵢ vᵢ(cᵢ) and an additive cost C(c) = Σᵢ sᵢ(cᵢ), the set of
non-dominated (C, V) pairs over all configurations is built by merging layers one at a time:

    P₀ = {(0, 0)},   Pᵢ = nondominated{ (C + sᵢ(b), V + vᵢ(b)) : (C, V) ∈ Pᵢ₋₁, b a candidate of i }.

Dropping a dominated partial solution is safe because adding the same later layers to both
partials keeps the domination, so P_N is exactly the frontier (no cost discretisation). A
point is kept when its value is strictly below that of every point with lower or equal cost,
so the frontier has strictly increasing cost and strictly decreasing value. Back-pointers
(parent partial, candidate) per layer recover the configuration of every point.

With a budget B, partials whose cost plus the cheapest completion exceeds B are pruned too,
and the best configuration within B is the frontier point of largest cost ≤ B.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from planner.objective import BUDGET_RTOL, Choice, Objective, Table

MAX_PARTIALS = 4_000_000  # bounds the memory of one DP layer (cost, value, back-pointers)


class InfeasibleBudget(ValueError):
    """The budget is below the cheapest configuration."""

    def __init__(self, kind: str, budget: float, min_cost: float) -> None:
        super().__init__(
            f"budget {budget:.6g} for cost {kind!r} is infeasible: the cheapest configuration costs {min_cost:.6g}"
        )
        self.kind = kind
        self.budget = budget
        self.min_cost = min_cost


@dataclass(frozen=True)
class FrontierPoint:
    """One configuration on a frontier; ``value`` is Ω for the diagonal frontier."""

    choice: Choice
    cost: float
    value: float


@dataclass(frozen=True, eq=False)
class Frontier:
    """Non-dominated points, by increasing cost (and strictly decreasing value)."""

    kind: str
    costs: np.ndarray  # (P,)
    values: np.ndarray  # (P,)
    choices: np.ndarray  # (P, N) candidate index per layer

    def __len__(self) -> int:
        return len(self.costs)

    def __getitem__(self, k: int) -> FrontierPoint:
        return FrontierPoint(tuple(int(b) for b in self.choices[k]), float(self.costs[k]), float(self.values[k]))

    def __iter__(self) -> Iterator[FrontierPoint]:
        return (self[k] for k in range(len(self)))

    def best_within(self, budget: float) -> FrontierPoint:
        """The point of least value with cost ≤ budget (the last one within it)."""
        slack = BUDGET_RTOL * max(1.0, abs(budget))
        k = int(np.searchsorted(self.costs, budget + slack, side="right")) - 1
        if k < 0:
            raise InfeasibleBudget(self.kind, budget, float(self.costs[0]))
        return self[k]


def min_cost(objective: Objective, kind: str) -> float:
    """The cost of the cheapest configuration."""
    return float(sum(row.min() for row in objective.cost_table(kind)))


def diagonal_frontier(objective: Objective, kind: str, *, max_partials: int = MAX_PARTIALS) -> Frontier:
    """The whole exact (cost, Ω) Pareto frontier."""
    return separable_frontier(objective.omega, objective.cost_table(kind), kind=kind, max_partials=max_partials)


def solve_budget(
    objective: Objective,
    kind: str,
    budget: float,
    *,
    values: Table | None = None,
    max_partials: int = MAX_PARTIALS,
) -> FrontierPoint:
    """The configuration of least Ω (or of least Σ ``values``) with cost ≤ budget; exact.

    Raises ``InfeasibleBudget`` (a ``ValueError``) naming the minimum cost when none exists.
    """
    costs = objective.cost_table(kind)
    frontier = separable_frontier(
        objective.omega if values is None else values, costs, kind=kind, budget=budget, max_partials=max_partials
    )
    return frontier.best_within(budget)


def separable_frontier(
    values: Table,
    costs: Table,
    *,
    kind: str = "cost",
    budget: float | None = None,
    max_partials: int = MAX_PARTIALS,
) -> Frontier:
    """Exact frontier of (Σ sᵢ(cᵢ), Σ vᵢ(cᵢ)); only costs ≤ ``budget`` when one is given."""
    if len(values) != len(costs):
        raise ValueError(f"values have {len(values)} layers, costs {len(costs)}")
    cheapest = [float(row.min()) for row in costs]
    if budget is not None and sum(cheapest) > budget + BUDGET_RTOL * max(1.0, abs(budget)):
        raise InfeasibleBudget(kind, budget, sum(cheapest))
    # cheapest completion after layer i, for budget pruning
    rest = np.concatenate([np.cumsum(cheapest[::-1])[::-1], [0.0]])
    cost, value = np.zeros(1), np.zeros(1)
    parents: list[np.ndarray] = []
    picks: list[np.ndarray] = []
    for i, (v_i, s_i) in enumerate(zip(values, costs)):
        if len(cost) * len(s_i) > max_partials:
            raise ValueError(
                f"the frontier DP needs {len(cost) * len(s_i)} partial solutions at layer {i}, "
                f"above the limit max_partials={max_partials}"
            )
        merged_cost = (cost[:, None] + s_i[None, :]).ravel()
        merged_value = (value[:, None] + v_i[None, :]).ravel()
        candidates = np.arange(len(merged_cost))
        if budget is not None:
            candidates = candidates[merged_cost + rest[i + 1] <= budget + BUDGET_RTOL * max(1.0, abs(budget))]
        keep = candidates[nondominated_indices(merged_cost[candidates], merged_value[candidates])]
        parents.append((keep // len(s_i)).astype(np.int64))
        picks.append((keep % len(s_i)).astype(np.int16))
        cost, value = merged_cost[keep], merged_value[keep]
    return Frontier(kind, cost, value, _backtrack(parents, picks))


def nondominated_indices(cost: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Indices of points whose value is strictly below that of every cheaper-or-equal point,
    ordered by increasing cost."""
    order = np.lexsort((value, cost))  # by cost, then value
    sorted_value = value[order]
    best_before = np.concatenate([[np.inf], np.minimum.accumulate(sorted_value)[:-1]])
    return order[sorted_value < best_before]


def _backtrack(parents: Sequence[np.ndarray], picks: Sequence[np.ndarray]) -> np.ndarray:
    """Candidate index per layer for every final point, following all back-pointers at once."""
    n_points = len(picks[-1])
    choices = np.empty((n_points, len(picks)), dtype=np.int16)
    point = np.arange(n_points)
    for i in range(len(picks) - 1, -1, -1):
        choices[:, i] = picks[i][point]
        point = parents[i][point]
    return choices

"""Diagonal frontier: the knapsack DP against brute force and against HiGHS."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import Bounds, LinearConstraint, milp

from planner.frontier import InfeasibleBudget, diagonal_frontier, min_cost, solve_budget
from planner.objective import Objective, synthetic_objective


def random_objective(seed: int, n_layers: int, max_candidates: int, integer_costs: bool) -> Objective:
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, max_candidates + 1, size=n_layers)

    def draw(k: int) -> np.ndarray:
        return rng.integers(0, 6, size=k).astype(float) if integer_costs else rng.uniform(0, 5, size=k)

    return Objective(
        layers=tuple(f"l{i}" for i in range(n_layers)),
        candidates=tuple(tuple(f"c{b}" for b in range(k)) for k in counts),
        omega=[draw(k) for k in counts],  # integer values make ties, the hard case for dominance
        costs={"size": [draw(k) for k in counts]},
    )


def all_points(objective: Objective) -> list[tuple[float, float, tuple[int, ...]]]:
    choices = itertools.product(*(range(len(names)) for names in objective.candidates))
    return [(objective.cost(c, "size"), objective.evaluate(c)[0], c) for c in choices]


def brute_frontier(objective: Objective) -> list[tuple[float, float]]:
    points = all_points(objective)
    front = {
        (cost, value)
        for cost, value, _ in points
        if not any(c <= cost and v <= value and (c, v) != (cost, value) for c, v, _ in points)
    }
    return sorted(front)


instances = st.builds(
    random_objective,
    seed=st.integers(0, 2**32 - 1),
    n_layers=st.integers(1, 4),
    max_candidates=st.integers(1, 4),
    integer_costs=st.booleans(),
)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(instances)
def test_frontier_equals_brute_force(objective):
    frontier = diagonal_frontier(objective, "size")
    expected = brute_frontier(objective)
    assert np.allclose(frontier.costs, [c for c, _ in expected])
    assert np.allclose(frontier.values, [v for _, v in expected])
    # strictly increasing cost, strictly decreasing value: no point dominates another
    assert np.all(np.diff(frontier.costs) > 0) and np.all(np.diff(frontier.values) < 0)
    for point in frontier:  # back-pointers recover the configuration of each point
        assert objective.cost(point.choice, "size") == pytest.approx(point.cost)
        assert objective.evaluate(point.choice)[0] == pytest.approx(point.value)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(instances, st.floats(0.0, 1.0))
def test_solve_budget_equals_brute_force(objective, fraction):
    points = all_points(objective)
    costs = [c for c, _, _ in points]
    budget = min(costs) + fraction * (max(costs) - min(costs))
    best = solve_budget(objective, "size", budget)
    assert best.cost <= budget + 1e-9
    assert best.value == pytest.approx(min(v for c, v, _ in points if c <= budget + 1e-9))


def highs_optimum(objective: Objective, budget: float) -> float:
    """The multiple-choice knapsack as a MILP: min Ω·x, one-hot per layer, cost·x ≤ budget."""
    n = objective.size
    one_hot = np.zeros((objective.n_layers, n))
    one_hot[objective.layer_of, np.arange(n)] = 1.0
    constraints = [
        LinearConstraint(one_hot, 1.0, 1.0),
        LinearConstraint(objective.flat_cost("size")[None, :], -np.inf, budget),
    ]
    res = milp(
        objective.flat_omega,
        integrality=np.ones(n),
        bounds=Bounds(0, 1),
        constraints=constraints,
        options={"mip_rel_gap": 0.0},
    )
    assert res.status == 0
    return float(res.fun)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_solve_budget_matches_highs(seed):
    objective = synthetic_objective(30, seed=seed, integer_costs=False)
    frontier = diagonal_frontier(objective, "size")
    for budget in np.quantile(frontier.costs, [0.0, 0.1, 0.5, 0.9]):
        best = solve_budget(objective, "size", float(budget))
        assert best.value == pytest.approx(highs_optimum(objective, float(budget)), rel=1e-6, abs=1e-9)


def test_best_within_a_budget_is_on_the_frontier():
    objective = synthetic_objective(12, seed=5)
    frontier = diagonal_frontier(objective, "size")
    point = frontier[len(frontier) // 2]
    assert solve_budget(objective, "size", point.cost).value == pytest.approx(point.value)
    assert frontier.best_within(point.cost + 0.5).cost == point.cost  # integer costs: nothing between


def test_infeasible_budget_names_the_minimum_cost():
    objective = synthetic_objective(5, seed=0)
    cheapest = min_cost(objective, "size")
    with pytest.raises(InfeasibleBudget, match=f"cheapest configuration costs {cheapest:.6g}") as error:
        solve_budget(objective, "size", cheapest - 1)
    assert error.value.min_cost == cheapest
    assert solve_budget(objective, "size", cheapest).cost == cheapest  # exactly the minimum is feasible


def test_partial_solution_limit():
    objective = synthetic_objective(20, seed=0, integer_costs=False)
    with pytest.raises(ValueError, match="above the limit max_partials=100"):
        diagonal_frontier(objective, "size", max_partials=100)

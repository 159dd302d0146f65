"""Inter-layer objective: the MILP against brute force, heuristic gaps and bounds, frontiers."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linprog
from scipy.sparse import coo_matrix

from planner.frontier import InfeasibleBudget, min_cost, solve_budget
from planner.objective import Objective, synthetic_objective
from planner.quadratic import default_budgets, knapsack_lp, quadratic_frontier, row_minimum_bound, solve_quadratic


def random_objective(seed: int, n_layers: int, max_candidates: int) -> Objective:
    """Random symmetric, generally indefinite G; candidate 0 is fp32 (zero rows)."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, max_candidates + 1, size=n_layers)
    size = int(counts.sum())
    A = rng.normal(size=(size, size))
    G = A + A.T
    fp32 = np.concatenate([[0], np.cumsum(counts)[:-1]])
    G[fp32, :] = 0.0
    G[:, fp32] = 0.0
    linear = [np.concatenate([[0.0], rng.normal(size=k - 1)]) for k in counts]
    return Objective(
        layers=tuple(f"l{i}" for i in range(n_layers)),
        candidates=tuple(("fp32", *(f"c{b}" for b in range(1, k))) for k in counts),
        omega=[np.concatenate([[0.0], rng.uniform(0, 1, size=k - 1)]) for k in counts],
        linear=linear,
        G=G,
        costs={"size": [np.concatenate([[8.0], rng.integers(0, 8, size=k - 1)]) for k in counts]},
    )


def brute_optimum(objective: Objective, budget: float) -> float:
    values = [
        objective.evaluate(c)[1]
        for c in itertools.product(*(range(len(names)) for names in objective.candidates))
        if objective.cost(c, "size") <= budget + 1e-9
    ]
    return min(values)


instances = st.builds(
    random_objective, seed=st.integers(0, 2**32 - 1), n_layers=st.integers(1, 4), max_candidates=st.integers(1, 3)
)


def budget_between(objective: Objective, fraction: float) -> float:
    cheapest = min_cost(objective, "size")
    return cheapest + fraction * (8.0 * objective.n_layers - cheapest)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(instances, st.floats(0.0, 1.0))
def test_milp_equals_brute_force(objective, fraction):
    budget = budget_between(objective, fraction)
    result = solve_quadratic(objective, "size", budget, method="milp")
    assert result.proven_optimal and result.method == "milp"
    assert result.gap == 0.0
    assert result.value == pytest.approx(brute_optimum(objective, budget), abs=1e-6)
    assert result.cost <= budget + 1e-9
    assert objective.evaluate(result.choice)[1] == pytest.approx(result.value)


@pytest.mark.slow
@settings(max_examples=25, deadline=None, derandomize=True)
@given(instances, st.floats(0.0, 1.0))
def test_heuristic_bounds_bracket_the_optimum(objective, fraction):
    budget = budget_between(objective, fraction)
    optimum = brute_optimum(objective, budget)
    result = solve_quadratic(objective, "size", budget, method="heuristic", time_limit=2.0)
    assert result.cost <= budget + 1e-9
    assert result.gap >= 0.0
    assert result.lower_bound <= optimum + 1e-6 <= result.value + 2e-6
    assert row_minimum_bound(objective, "size", budget) <= optimum + 1e-9
    if result.proven_optimal:
        assert result.gap == 0.0 and result.value == pytest.approx(optimum, abs=1e-6)


@pytest.mark.parametrize("seed", range(6))
def test_knapsack_lp_matches_highs(seed):
    objective = synthetic_objective(12, seed=seed, integer_costs=seed % 2 == 0)
    rng = np.random.default_rng(seed)
    cost = objective.flat_cost("size")
    g = rng.normal(size=objective.size) - 5.0 * cost / cost.max()  # prefers dear candidates: the budget binds
    budget = min_cost(objective, "size") + rng.uniform(0.0, 0.5) * (cost.max() * objective.n_layers)
    one_hot = coo_matrix((np.ones(objective.size), (objective.layer_of, np.arange(objective.size))))
    highs = linprog(g, A_ub=cost[None, :], b_ub=[budget], A_eq=one_hot, b_eq=np.ones(objective.n_layers), bounds=(0, 1))
    s, bound = knapsack_lp(objective, "size", budget, g)
    assert bound <= highs.fun + 1e-9 * abs(highs.fun)
    assert g @ s == pytest.approx(highs.fun, rel=1e-7) and bound == pytest.approx(highs.fun, rel=1e-7)
    assert cost @ s <= budget * (1 + 1e-9) and np.allclose(one_hot @ s, 1.0) and np.all(s >= 0)


def test_time_limited_milp_reports_a_valid_gap():
    # 30 layers with an indefinite G: far more than HiGHS can prove in 0.2 s
    objective = synthetic_objective(30, ("fp32", "w8a8", "w4a8", "w4"), seed=1, negative_fraction=0.2)
    budget = float(np.median(default_budgets(objective, "size", 9)))
    result = solve_quadratic(objective, "size", budget, method="milp", time_limit=0.2)
    assert result.cost <= budget
    assert result.gap >= 0.0
    if not result.proven_optimal:
        assert result.method in ("milp+local-search", "heuristic")
        assert result.bound_method in ("milp-dual-bound", "convex-relaxation", "row-minimum")
        assert result.gap > 0.0


def test_separable_case_is_proven_by_the_heuristic():
    # G = 0: ΔL is separable, the row-minimum bound is the exact optimum, so the gap closes
    objective = synthetic_objective(40, seed=2)
    separable = Objective(objective.layers, objective.candidates, objective.omega, objective.costs, objective.linear)
    budget = float(np.median(default_budgets(separable, "size", 5)))
    result = solve_quadratic(separable, "size", budget, method="heuristic")
    assert result.proven_optimal and result.gap == 0.0
    assert result.value == pytest.approx(solve_budget(separable, "size", budget, values=separable.linear).value)


@pytest.mark.slow
def test_auto_uses_the_milp_on_small_models_and_the_heuristic_beyond_the_limit():
    objective = synthetic_objective(6, seed=4)
    budget = float(np.median(default_budgets(objective, "size", 5)))
    assert solve_quadratic(objective, "size", budget).method == "milp"
    heuristic = solve_quadratic(objective, "size", budget, max_milp_variables=10, time_limit=2.0)
    assert heuristic.method == "heuristic"
    assert heuristic.lower_bound <= solve_quadratic(objective, "size", budget).value + 1e-9


def test_frontier_is_non_dominated_and_optimal_per_budget():
    objective = random_objective(7, n_layers=4, max_candidates=3)
    results = quadratic_frontier(objective, "size", max_points=6)
    costs = [r.cost for r in results]
    values = [r.value for r in results]
    assert costs == sorted(costs) and len(set(costs)) == len(costs)
    assert all(b < a for a, b in itertools.pairwise(values))  # more cost buys strictly less ΔL
    for result in results:
        assert result.cost <= result.budget + 1e-9
        assert result.value == pytest.approx(brute_optimum(objective, result.budget), abs=1e-6)


def test_default_budgets_are_thinned():
    objective = synthetic_objective(10, seed=0)
    budgets = default_budgets(objective, "size", 7)
    assert len(budgets) == 7 and budgets == sorted(budgets)
    assert budgets[0] == min_cost(objective, "size")


def test_infeasible_budget_and_bad_method():
    objective = synthetic_objective(4, seed=0)
    with pytest.raises(InfeasibleBudget, match="cheapest configuration costs"):
        solve_quadratic(objective, "size", min_cost(objective, "size") - 1)
    with pytest.raises(ValueError, match="method must be"):
        solve_quadratic(objective, "size", 1e9, method="exact")

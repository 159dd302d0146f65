"""Bisection: demotion orders, the evaluation bound, and the edge cases of measured drops."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planner.bisection import bisect, demotion_order, max_evaluations
from planner.objective import Objective, synthetic_objective


class CountingMeasure:
    """A real measure function stand-in: drop = table[k], k read back from the configuration."""

    def __init__(self, objective: Objective, low: str, drops: list[float]) -> None:
        self.objective, self.low, self.drops = objective, low, drops
        self.calls: list[int] = []

    def __call__(self, configuration: dict[str, str]) -> float:
        k = sum(candidate == self.low for candidate in configuration.values())
        self.calls.append(k)
        return self.drops[k]


def two_layers(G: np.ndarray | None = None) -> Objective:
    return Objective(
        layers=("a", "b", "c"),
        candidates=(("fp32", "w8", "w4"),) * 3,
        omega=[[0.0, 0.1, 1.0], [0.0, 0.1, 0.5], [0.0, 0.1, 3.0]],
        linear=[[0.0, 0.0, 1.0], [0.0, 0.0, 0.5], [0.0, 0.0, 3.0]],
        G=G,
        costs={"size": [[32, 8, 4], [32, 8, 4], [64, 16, 8]]},
    )


def test_diagonal_order_is_by_omega_increase_per_cost_saved():
    # scores: a 1.0/28, b 0.5/28, c 3.0/56 -> b, a, c
    assert demotion_order(two_layers(), "size", low="w4") == [1, 0, 2]


def test_interlayer_order_follows_cross_terms():
    objective = two_layers()
    assert demotion_order(objective, "size", low="w4", ordering="interlayer") == [1, 0, 2]  # G = 0: same order
    G = np.zeros((9, 9))
    a4, b4, c4 = objective.index("a", "w4"), objective.index("b", "w4"), objective.index("c", "w4")
    G[b4, c4] = G[c4, b4] = -6.0  # demoting c next to b is cheap in ΔL; next to a it is not
    G[a4, b4] = G[b4, a4] = 2.0
    coupled = Objective(objective.layers, objective.candidates, objective.omega, objective.costs, objective.linear, G)
    # after b: a costs (1 + 2)/28, c costs (3 − 6)/56 < 0 -> c comes before a
    assert demotion_order(coupled, "size", low="w4", ordering="interlayer") == [1, 2, 0]


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.integers(1, 70), st.data())
def test_monotone_drops_find_the_largest_k_within_the_bound(n_layers, data):
    objective = synthetic_objective(n_layers, ("fp32", "w8a8", "w4a8"), seed=n_layers)
    threshold = data.draw(st.integers(0, n_layers + 1))  # k < threshold is within tolerance
    drops = [0.01 * k + (5.0 if k >= threshold else 0.0) for k in range(n_layers + 1)]
    measure = CountingMeasure(objective, "w4a8", drops)
    result = bisect(objective, "size", measure, tolerance=1.0, low="w4a8")
    assert result.evaluations == len(measure.calls) <= math.ceil(math.log2(n_layers)) + 2
    assert result.evaluations <= max_evaluations(n_layers)
    expected = min(threshold - 1, n_layers) if threshold > 0 else 0
    assert result.best.k == expected
    assert result.within_tolerance == (threshold > 0)
    assert [step.k for step in result.steps] == measure.calls
    costs = {step.k: step.cost for step in result.steps}
    assert all(costs[i] > costs[j] for i in costs for j in costs if i < j)  # cost falls with k


def test_all_demoted_within_tolerance_takes_one_evaluation():
    objective = synthetic_objective(16, seed=0)
    measure = CountingMeasure(objective, "w4", [0.0] * 17)
    result = bisect(objective, "size", measure, tolerance=0.5, low="w4")
    assert measure.calls == [16] and result.best.k == 16 and result.within_tolerance
    assert set(result.configuration.values()) == {"w4"}


def test_nothing_within_tolerance_returns_the_measured_baseline():
    objective = synthetic_objective(16, seed=0)
    measure = CountingMeasure(objective, "w4", [0.2] + [9.0] * 16)
    result = bisect(objective, "size", measure, tolerance=0.5, low="w4")
    assert result.best.k == 0 and result.best.drop == 0.2 and result.within_tolerance
    assert set(result.configuration.values()) == {"fp32"}
    assert len(measure.calls) == max_evaluations(16) and measure.calls[-1] == 0
    # a baseline that is itself out of tolerance is still returned, flagged
    failing = bisect(objective, "size", CountingMeasure(objective, "w4", [0.7] + [9.0] * 16), tolerance=0.5, low="w4")
    assert failing.best.k == 0 and failing.best.drop == 0.7 and not failing.within_tolerance


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.integers(1, 40), st.data())
def test_non_monotone_drops_still_return_a_measured_point_within_tolerance(n_layers, data):
    objective = synthetic_objective(n_layers, ("fp32", "w8"), seed=n_layers)
    drops = data.draw(st.lists(st.sampled_from([0.0, 2.0]), min_size=n_layers + 1, max_size=n_layers + 1))
    drops[0] = 0.0  # the float baseline is within tolerance
    measure = CountingMeasure(objective, "w8", drops)
    result = bisect(objective, "size", measure, tolerance=1.0, low="w8", ordering="interlayer")
    assert len(measure.calls) <= max_evaluations(n_layers)
    assert result.best in result.steps and result.best.drop <= 1.0
    good = [step.k for step in result.steps if step.drop <= 1.0]
    assert result.best.k == max(good)  # the cheapest measured point within tolerance


def test_steps_carry_predictions_and_costs():
    objective = synthetic_objective(8, seed=1)
    result = bisect(objective, "size", CountingMeasure(objective, "w4", [0.1 * k for k in range(9)]), 0.35, low="w4")
    for step in result.steps:
        assert (step.predicted_omega, step.predicted_loss) == pytest.approx(objective.evaluate(step.configuration))
        assert step.cost == objective.cost(step.configuration, "size")
    assert result.best.k == 3
    data = json.loads(json.dumps(result.to_dict()))
    assert data["best"]["k"] == 3 and [s["k"] for s in data["steps"]] == [s.k for s in result.steps]


def test_layers_without_the_low_candidate_stay_high_and_a_high_no_layer_has_is_an_error():
    objective = Objective(
        layers=("a", "b"),
        candidates=(("fp32", "w4"), ("fp32", "w8")),
        omega=[[0.0, 1.0], [0.0, 1.0]],
        costs={"size": [[32, 4], [32, 8]]},
    )
    result = bisect(objective, "size", lambda configuration: 0.0, 1.0, low="w4")
    assert result.configuration == {"a": "w4", "b": "fp32"} and result.order == ("a",)
    with pytest.raises(ValueError, match="no layer has the candidate 'w8a8'"):
        bisect(objective, "size", lambda configuration: 0.0, 1.0, low="w4", high="w8a8")


def test_a_layer_without_the_high_candidate_stays_fp32_in_every_step():
    """An excluded layer (planner.exclude) offers fp32 alone; demoting w8 -> w4 leaves it there."""
    objective = Objective(
        layers=("a", "x", "b"),
        candidates=(("fp32", "w8", "w4"), ("fp32",), ("fp32", "w8", "w4")),
        omega=[[0.0, 0.1, 1.0], [0.0], [0.0, 0.1, 2.0]],
        costs={"size": [[32, 8, 4], [32], [32, 8, 4]]},
    )
    measure = CountingMeasure(objective, "w4", [0.0, 0.5, 2.0])
    result = bisect(objective, "size", measure, 1.0, low="w4", high="w8")
    assert result.order == ("a", "b") and result.configuration == {"a": "w4", "x": "fp32", "b": "w8"}
    assert all(step.configuration["x"] == "fp32" for step in result.steps) and len(result.steps) >= 2
    with pytest.raises(ValueError, match="non-finite drop"):
        bisect(objective, "size", lambda configuration: float("nan"), 1.0, low="w4")
    with pytest.raises(ValueError, match="tolerance must be a finite number"):
        bisect(objective, "size", lambda configuration: 0.0, float("nan"), low="w4")
    with pytest.raises(ValueError, match="ordering must be"):
        demotion_order(objective, "size", low="w4", ordering="random")

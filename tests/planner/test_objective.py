"""Objective: flat index, evaluation, costs, validation and JSON round trip."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from planner.objective import Objective, synthetic_objective, within_budget


def small() -> Objective:
    # two layers: a has (fp32, w8, w4), b has (fp32, w4); flat index a:0..2, b:3..4
    G = np.zeros((5, 5))
    G[1, 1], G[2, 2], G[4, 4] = 0.2, 0.8, 1.0
    G[2, 4] = G[4, 2] = -0.3
    G[1, 4] = G[4, 1] = 0.1
    G[1, 2] = G[2, 1] = 0.5  # within one layer: never used by a configuration
    return Objective(
        layers=("a", "b"),
        candidates=(("fp32", "w8", "w4"), ("fp32", "w4")),
        omega=[[0.0, 0.1, 0.4], [0.0, 0.5]],
        linear=[[0.0, 0.01, 0.02], [0.0, -0.05]],
        G=G,
        costs={"size": [[32, 8, 4], [64, 8]]},
    )


def test_flat_index_and_blocks():
    objective = small()
    assert objective.size == 5 and objective.n_layers == 2
    assert objective.index("b", "w4") == 4 and objective.index(0, "w8") == 1
    assert objective.layer_of.tolist() == [0, 0, 0, 1, 1]
    assert objective.block(0, 1)[2, 1] == -0.3


def test_evaluate_matches_the_formula():
    objective = small()
    # a=w4, b=w4: Ω = 0.4 + 0.5; ΔL = 0.02 − 0.05 + ½(0.8 + 1.0 + 2·(−0.3))
    omega, loss = objective.evaluate({"a": "w4", "b": "w4"})
    assert omega == pytest.approx(0.9)
    assert loss == pytest.approx(0.02 - 0.05 + 0.5 * (0.8 + 1.0 - 0.6))
    # a=w8, b=fp32: the within-layer entry G[1,2] does not count
    assert objective.evaluate((1, 0)) == pytest.approx((0.1, 0.01 + 0.1))
    assert objective.cost({"a": "w8", "b": "w4"}, "size") == 16


def test_configuration_round_trip():
    objective = small()
    assert objective.configuration((2, 1)) == {"a": "w4", "b": "w4"}
    assert objective.choice_of({"a": "w4", "b": "fp32"}) == (2, 0)


def test_json_round_trip_is_exact():
    objective = synthetic_objective(4, seed=3, integer_costs=False)
    again = Objective.from_dict(json.loads(json.dumps(objective.to_dict())))
    assert again.equals(objective)
    assert np.array_equal(again.G, objective.G)


def test_from_weight_bits_duplicates_shared_perturbations():
    rng = np.random.default_rng(0)
    labels = [("a", 8), ("a", 4), ("b", 4)]
    A = rng.normal(size=(3, 3))
    G_bits, omega_bits, linear_bits = A @ A.T, [0.1, 0.4, 0.5], [0.01, 0.02, -0.05]
    objective = Objective.from_weight_bits(
        ("a", "b"),
        (("fp32", "w8a8", "w8", "w4"), ("fp32", "w4a8")),
        {"fp32": None, "w8a8": 8, "w8": 8, "w4": 4, "w4a8": 4},
        labels,
        omega=omega_bits,
        linear=linear_bits,
        G=G_bits,
        costs={"size": [[32, 8, 8, 4], [64, 8]]},
    )
    for configuration, picked in [
        ({"a": "w8", "b": "w4a8"}, [0, 2]),
        ({"a": "w8a8", "b": "w4a8"}, [0, 2]),
        ({"a": "w4", "b": "fp32"}, [1]),
        ({"a": "fp32", "b": "fp32"}, []),
    ]:
        expected_loss = sum(linear_bits[k] for k in picked) + 0.5 * G_bits[np.ix_(picked, picked)].sum()
        assert objective.evaluate(configuration) == pytest.approx((sum(omega_bits[k] for k in picked), expected_loss))
    with pytest.raises(ValueError, match="one per label"):
        Objective.from_weight_bits(
            ("a",),
            (("w8",),),
            {"w8": 8},
            labels,
            omega=omega_bits,
            linear=linear_bits[:2],
            G=G_bits,
            costs={"size": [[8]]},
        )
    with pytest.raises(ValueError, match="no terms for layer 'b' at 8 weight bits"):
        Objective.from_weight_bits(
            ("a", "b"),
            (("w8",), ("w8",)),
            {"w8": 8},
            labels,
            omega=omega_bits,
            linear=linear_bits,
            G=G_bits,
            costs={"size": [[8], [8]]},
        )


def test_pickles_for_worker_processes():
    objective = synthetic_objective(3, seed=0)
    assert pickle.loads(pickle.dumps(objective)).equals(objective)


def test_defaults_are_zero():
    objective = Objective(layers=("a",), candidates=(("w8", "w4"),), omega=[[1.0, 2.0]], costs={"size": [[8, 4]]})
    assert objective.evaluate((1,)) == (2.0, 0.0)


def test_small_asymmetry_is_symmetrized():
    objective = small()
    G = np.array(objective.G)
    G[2, 4] += 1e-6
    again = Objective(objective.layers, objective.candidates, objective.omega, objective.costs, objective.linear, G)
    assert again.G[2, 4] == again.G[4, 2]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"G": "asymmetric"}, "not symmetric"),
        ({"G": np.zeros((4, 4))}, "G has shape"),
        ({"omega": [[0.0, 0.1], [0.0, 0.5]]}, r"omega\[layer 0\] has shape"),
        ({"omega": [[0.0, np.nan, 0.4], [0.0, 0.5]]}, "non-finite"),
        ({"omega": [[0.3, 0.1, 0.4], [0.0, 0.5]]}, "omega of fp32 must be 0"),
        ({"linear": [[0.0, 0.0, 0.0], [0.2, 0.0]]}, "linear of fp32 must be 0"),
        ({"G": "fp32-row"}, "G row of fp32 must be 0"),
        ({"layers": ("a", "a")}, "unique"),
        ({"candidates": (("fp32", "w8", "w8"), ("fp32", "w4"))}, "duplicate candidate"),
        ({"costs": {}}, "at least one kind"),
        ({"costs": {"size": [[32, 8, np.inf], [64, 8]]}}, "non-finite"),
    ],
)
def test_bad_input_is_named(change, message):
    objective = small()
    fields = dict(
        layers=objective.layers,
        candidates=objective.candidates,
        omega=objective.omega,
        costs=objective.costs,
        linear=objective.linear,
        G=np.array(objective.G),
    )
    fields.update(change)
    if isinstance(fields["G"], str):
        G = np.array(objective.G)
        if change["G"] == "asymmetric":
            G[2, 4] += 0.1
        else:
            G[0, 4] = G[4, 0] = 0.1
        fields["G"] = G
    with pytest.raises(ValueError, match=message):
        Objective(**fields)


def test_bad_configurations_and_kinds():
    objective = small()
    with pytest.raises(ValueError, match="missing layers"):
        objective.evaluate({"a": "w4"})
    with pytest.raises(ValueError, match="no candidate 'w2'"):
        objective.evaluate({"a": "w2", "b": "w4"})
    with pytest.raises(ValueError, match="no candidate index 2"):
        objective.evaluate((0, 2))
    with pytest.raises(KeyError, match="unknown cost kind 'bops'"):
        objective.cost((0, 0), "bops")


def test_from_dict_rejects_unknown_format_and_malformed_tables():
    with pytest.raises(ValueError, match="unknown objective format"):
        Objective.from_dict({"format": "other", "layers": []})
    data = small().to_dict()
    with pytest.raises(ValueError, match="omega must be a list"):
        Objective.from_dict({**data, "omega": 5})
    with pytest.raises(ValueError, match=r"costs\['size'\]\[layer 1\] must be numbers"):
        Objective.from_dict({**data, "costs": {"size": [[32, 8, 4], ["a", "b"]]}})


def test_within_budget_has_relative_slack():
    assert within_budget(1e6 + 1e-4, 1e6)
    assert not within_budget(1e6 + 1.0, 1e6)

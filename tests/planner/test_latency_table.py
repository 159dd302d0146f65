"""The latency table: serialisation, predictions, and its use as the search's cost on models whose
int8 layers are slower or faster than float (measured, interleaved, in the tests themselves)."""

from __future__ import annotations

import dataclasses
import itertools
import json

import numpy as np
import pytest

from planner.choose import predicted_point
from planner.cost import layer_cost_table
from planner.export import export_model
from planner.latency_table import (
    FORMAT,
    LatencyTable,
    LayerLatency,
    TimingSettings,
    additivity_check,
    adjacent_pairs,
    compare,
    measure_latency_table,
    measurement_timing,
    predict_latency,
    random_configurations,
    table_key,
    with_latency_costs,
)
from planner.objective import Objective
from planner.plan import normalize_for_plan, plan
from planner.request import PlanRequest
from sensitivity.onnx_program import load_onnx
from sensitivity.results import TraceConfig
from sensitivity.run import compute_sensitivity
from tests.models import latency_mixed_data, latency_mixed_model

TIMING = TimingSettings(device="cpu", threads=1)
CANDIDATES = ("fp32", "w8a8")
FAST = {"measure_uniform": False, "latency_repeats": 5, "latency_warmup": 2, "device": "cpu", "candidates": CANDIDATES}
SMALL = ("small0.weight", "small1.weight")


def hand_table(**changes: object) -> LatencyTable:
    table = LatencyTable(
        model_sha256="ab" * 32,
        device_description="test CPU (2 logical cores available)",
        provider="CPUExecutionProvider",
        onnxruntime_version="1.0.0",
        batch_size=1,
        threads=1,
        candidates=("fp32", "w8a8", "w4"),
        float_p50_ms=2.0,
        layers={
            "a": {"w8a8": LayerLatency(-0.5, -0.25, 0.02), "w4": LayerLatency(1.0, 0.5, 0.05)},
            "b": {"w8a8": LayerLatency(0.2, 0.1, 0.01), "w4": LayerLatency(-0.1, -0.05, 0.03)},
            "c": {},  # offers fp32 alone (excluded, or a structural constant)
        },
    )
    return dataclasses.replace(table, **changes)  # type: ignore[arg-type]


def test_table_round_trips_through_json():
    table = hand_table()
    data = json.loads(json.dumps(table.to_dict()))
    assert data["format"] == FORMAT
    assert LatencyTable.from_dict(data) == table


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(format="mpq.latency_table/0"), "format"),
        (lambda d: d.update(extra=1), "unknown keys"),
        (lambda d: d.pop("float_p50_ms"), "lacks"),
        (lambda d: d.update(float_p50_ms=0.0), "float_p50_ms must be positive"),
        (lambda d: d["layers"]["a"]["w8a8"].update(spread=-1.0), "spread must be >= 0"),
        (lambda d: d["layers"]["a"]["w8a8"].update(ratio="fast"), "must be a number"),
        (lambda d: d.update(batch_size=0), "batch_size"),
    ],
)
def test_bad_tables_are_refused_by_name(edit, message):
    data = hand_table().to_dict()
    edit(data)
    with pytest.raises(ValueError, match=message):
        LatencyTable.from_dict(data)


def test_prediction_is_one_plus_the_sum_of_contributions():
    table = hand_table()
    assert predict_latency(table, {"a": "fp32", "b": "fp32", "c": "fp32"}).ratio == 1.0
    single = predict_latency(table, {"a": "w8a8", "b": "fp32", "c": "fp32"})
    assert single.ratio == pytest.approx(0.75) and single.ms == pytest.approx(1.5)  # the measurement itself
    both = predict_latency(table, {"a": "w4", "b": "w4", "c": "fp32"})
    assert both.ratio == pytest.approx(1.45) and both.spread == pytest.approx(np.hypot(0.05, 0.03))
    with pytest.raises(ValueError, match="no entry for layer 'c' at 'w8a8'"):
        predict_latency(table, {"a": "fp32", "b": "fp32", "c": "w8a8"})


def test_a_table_matches_only_its_own_key():
    table = hand_table()
    assert table.matches(table.key())
    for field, value in [
        ("onnxruntime_version", "1.0.1"),
        ("device_description", "another CPU"),
        ("provider", "CUDAExecutionProvider"),
        ("batch_size", 8),
        ("model_sha256", "cd" * 32),
        ("candidates", ["fp32", "w8a8"]),
    ]:
        assert not table.matches({**table.key(), field: value}), field


def test_latency_costs_predict_every_configuration_exactly():
    """The search's latency cost (shifted to be >= 0, plus the offset) is the table's prediction, on
    every configuration of a small objective (brute force)."""
    table = hand_table()
    candidates = (("fp32", "w8a8", "w4"), ("fp32", "w8a8", "w4"), ("fp32",))
    objective = Objective(
        layers=("a", "b", "c"),
        candidates=candidates,
        omega=[[0.0, 1.0, 2.0], [0.0, 1.0, 2.0], [0.0]],
        costs={"size": [[4, 1, 1], [4, 1, 1], [4]], "bops": [[4, 1, 1], [4, 1, 1], [4]]},
    )
    costs = layer_cost_table(latency_mixed_model(), (1, 32, 512))
    objective, costs = with_latency_costs(objective, costs, table)
    assert all((row >= 0).all() for row in objective.cost_table("latency"))
    for picks in itertools.product(*candidates):
        configuration = dict(zip(objective.layers, picks))
        point = predicted_point(objective, costs, configuration)
        assert point.latency_ms == pytest.approx(predict_latency(table, configuration).ms, abs=1e-12)


def test_faster_than_float_needs_the_ratio_interval_wholly_below_one():
    from planner.latency import LatencyMeasurement, RelativeLatency

    measurement = LatencyMeasurement(1.0, 1.0, 1.0, 1, 5, "cpu", "CPUExecutionProvider", "1.0.0")

    def ratio(value: float, spread: float) -> RelativeLatency:
        return RelativeLatency(measurement, 1.0, value, spread, 50)

    assert ratio(0.45, 0.25).faster
    assert not ratio(0.94, 0.80).faster  # the tiny transformer's noisy best, 50 rounds
    assert not ratio(1.0, 0.0).faster and not ratio(1.2, 0.01).faster and not ratio(0.9, 0.1).faster


def test_the_latency_objective_is_a_checked_request_field():
    assert PlanRequest(method="hawq_v2").objective == "loss" and PlanRequest(method="hawq_v2").cost_kind == "size"
    assert PlanRequest(method="hawq_v2", objective="latency").cost_kind == "latency"
    assert (
        PlanRequest(method="hawq_v2", max_latency_ms=5.0).cost_kind == "latency"
        and PlanRequest(method="hawq_v2", max_latency_ms=5.0).budget == 5.0
    )
    assert PlanRequest(method="hawq_v2", objective="latency", max_bops=10).cost_kind == "bops"
    assert PlanRequest.from_dict(PlanRequest(method="hawq_v2", objective="latency").to_dict()).objective == "latency"
    with pytest.raises(ValueError, match="objective"):
        PlanRequest(method="hawq_v2", objective="speed")


# ----- measured: the mixed model (big MatMul faster at w8a8, small ones slower) -----------------


@pytest.fixture(scope="module")
def mixed():
    model, data = latency_mixed_model(), latency_mixed_data(count=8)
    request = PlanRequest(method="hawq_v2", **FAST)
    return normalize_for_plan(model, data, request), data


@pytest.fixture(scope="module")
def mixed_table(mixed):
    normalized, data = mixed
    return measure_latency_table(normalized, data, CANDIDATES, timing=TIMING)


@pytest.fixture(scope="module")
def mixed_sensitivity(mixed):
    normalized, data = mixed
    config = TraceConfig(max_probes=4, min_probes=2, device="cpu")
    return compute_sensitivity(load_onnx(normalized.model), data, config)


@pytest.mark.slow
def test_table_has_every_layer_and_its_key(mixed, mixed_table):
    normalized, _ = mixed
    assert set(mixed_table.layers) == {"big.weight", *SMALL}
    assert all(set(entries) == {"w8a8"} for entries in mixed_table.layers.values())
    assert mixed_table.matches(table_key(normalized, CANDIDATES, TIMING))
    assert mixed_table.float_p50_ms > 0 and mixed_table.provider == "CPUExecutionProvider"
    entry = mixed_table.layers["big.weight"]["w8a8"]
    assert entry.ms == pytest.approx(entry.ratio * mixed_table.float_p50_ms)


def test_adjacent_layers_are_found_through_non_layer_nodes():
    # big -> Relu -> Reshape -> small0 -> Tanh -> small1 -> Tanh
    assert adjacent_pairs(latency_mixed_model()) == [
        ("big.weight", "small0.weight"),
        ("small0.weight", "small1.weight"),
    ]


def test_pair_terms_apply_where_both_layers_quantize_activations():
    pair = LayerLatency(-0.4, -0.2, 0.04)
    table = hand_table(pairs={("a", "b"): {"w8a8": pair}})
    alone = predict_latency(table, {"a": "w8a8", "b": "fp32", "c": "fp32"}).ratio
    assert alone == pytest.approx(0.75)  # one layer: its own variant, no pair
    both = predict_latency(table, {"a": "w8a8", "b": "w8a8", "c": "fp32"})
    assert both.ratio == pytest.approx(1.0 - 0.25 + 0.1 - 0.2)  # the pair's variant, as measured
    assert both.spread == pytest.approx(np.sqrt(0.02**2 + 0.01**2 + 0.04**2))
    assert predict_latency(table, {"a": "w4", "b": "w8a8", "c": "fp32"}).ratio == pytest.approx(1.6)  # w4: no pair
    mixed = hand_table(pairs={("a", "b"): {"w8a8": pair, "w4a8": LayerLatency(0.0, 0.0, 0.0)}})
    assert mixed.interaction(("a", "b"), ("w8a8", "w4a8")) == pytest.approx(-0.1)  # the mean of the two
    assert mixed.interaction(("a", "b"), ("w8a8", "w4")) == 0.0
    # The knapsack's cost: half the pair on each side, exact where both take the candidate
    assert table.folded_contribution("a", "w8a8") == pytest.approx(-0.25 - 0.1)
    assert table.folded_contribution("a", "w8a8") + table.folded_contribution("b", "w8a8") == pytest.approx(
        both.ratio - 1.0
    )
    data = json.loads(json.dumps(table.to_dict()))
    assert LatencyTable.from_dict(data) == table
    del data["pairs"]  # stored before pairs were measured: read as none
    assert LatencyTable.from_dict(data).pairs == {}
    data["pairs"] = [{"layers": ["a", "zz"], "candidates": {}}]
    with pytest.raises(ValueError, match="two of the table's layers"):
        LatencyTable.from_dict(data)


@pytest.mark.slow
def test_pair_variants_are_measured_and_predicted_as_measured(mixed, mixed_table):
    """Each adjacent pair at w8a8 is a variant of its own: the table predicts it as measured (its term
    is the measured joint ratio less the two single-layer contributions)."""
    assert set(mixed_table.pairs) == {("big.weight", "small0.weight"), ("small0.weight", "small1.weight")}
    assert all(set(entries) == {"w8a8"} for entries in mixed_table.pairs.values())
    for first, second in mixed_table.pairs:
        term = mixed_table.pairs[(first, second)]["w8a8"]
        configuration = {"big.weight": "fp32", **dict.fromkeys(SMALL, "fp32"), first: "w8a8", second: "w8a8"}
        singles = mixed_table.layers[first]["w8a8"].ratio + mixed_table.layers[second]["w8a8"].ratio
        assert predict_latency(mixed_table, configuration).ratio == pytest.approx(1.0 + singles + term.ratio)
        assert term.ms == pytest.approx(term.ratio * mixed_table.float_p50_ms) and term.spread >= 0


@pytest.mark.slow
def test_table_signs_agree_with_an_independent_interleaved_run(mixed, mixed_table):
    """The model is built so that w8a8 is faster on the big MatMul and slower on the small ones; a
    second interleaved run of the configurations confirms both, and the table says the same."""
    normalized, data = mixed
    layers = ["big.weight", *SMALL]

    def exported(quantized: set[str]) -> bytes:
        configuration = {layer: "w8a8" if layer in quantized else "fp32" for layer in layers}
        return export_model(normalized, configuration, data).model_bytes

    big, small = compare(
        [exported({"big.weight"}), exported(set(SMALL))], normalized.model.SerializeToString(), data, TIMING
    )
    assert big.ratio < 1 < small.ratio
    assert mixed_table.layers["big.weight"]["w8a8"].ratio < 0
    assert all(mixed_table.layers[layer]["w8a8"].ratio > 0 for layer in SMALL)


@pytest.mark.slow
def test_additivity_check_compares_predicted_with_measured(mixed, mixed_table):
    normalized, data = mixed
    configurations = random_configurations(mixed_table, 4, seed=3)
    check = additivity_check(normalized, data, mixed_table, configurations, timing=TIMING)
    assert check.predicted == tuple(predict_latency(mixed_table, c).ratio for c in configurations)
    assert len(check.measured) == 4 and all(m > 0 for m in check.measured)
    assert check.median_error < 0.5  # a ratio: the table predicts within half the float time
    assert check.to_dict()["configurations"] == 4


@pytest.mark.slow
def test_latency_objective_keeps_slow_layers_float_and_quantizes_the_fast_one(mixed, mixed_table, mixed_sensitivity):
    normalized, data = mixed
    request = PlanRequest(method="hawq_v2", search="bisection", objective="latency", max_drop=50.0, **FAST)
    result = plan(normalized, data, request, sensitivity=mixed_sensitivity, latency_table=mixed_table)
    search = result.run.search
    assert search["latency_table_reused"] is True
    assert search["order"] == ["big.weight"]  # the small layers are predicted slower: never demoted
    assert result.plan.configuration == {"big.weight": "w8a8", "small0.weight": "fp32", "small1.weight": "fp32"}
    assert search["latency_ratio"] < 1  # measured against the float model, interleaved
    assert result.plan.measured is not None and result.plan.measured.drop <= 50.0
    assert all(point.measured is not None for point in result.frontier)


@pytest.mark.slow
def test_a_latency_bisection_also_measures_the_uniform_low_configuration(mixed, mixed_table, mixed_sensitivity):
    """A table biased against quantizing (every layer predicted 0.5 of the float time slower at w8a8)
    orders no demotion; uniform w8a8 is measured anyway and competes on its measured ratio."""
    normalized, data = mixed
    slower = LayerLatency(0.5 * mixed_table.float_p50_ms, 0.5, 0.01)
    biased = dataclasses.replace(
        mixed_table, layers={layer: {"w8a8": slower} for layer in mixed_table.layers}, pairs={}
    )
    request = PlanRequest(method="hawq_v2", search="bisection", objective="latency", max_drop=50.0, **FAST)
    result = plan(normalized, data, request, sensitivity=mixed_sensitivity, latency_table=biased)
    uniform = {layer: "w8a8" for layer in mixed_table.layers}
    assert result.run.search["order"] == []  # nothing predicted to save time
    assert [point.configuration for point in result.frontier if point.configuration == uniform] == [uniform]
    assert all(point.measured is not None for point in result.frontier)
    ratios = [entry["ratio"] for entry in result.run.search["latency_ratios"]]
    assert len(ratios) == 1  # the uniform configuration, timed against the float model
    if result.run.search["latency_ratio"] < 1.0:  # measured faster (its interval below 1): chosen
        assert result.plan.configuration == uniform and result.run.search["latency_ratio"] == ratios[0]
    else:
        assert set(result.plan.configuration.values()) == {"fp32"}


@pytest.mark.slow
def test_model_whose_int8_is_slower_everywhere_gets_the_float_model(mixed, mixed_table, mixed_sensitivity):
    """With the big MatMul excluded only the slow layers remain: the plan is the float model, said so."""
    normalized, data = mixed
    request = PlanRequest(
        method="hawq_v2", search="bisection", objective="latency", max_drop=50.0, exclude=("big.weight",), **FAST
    )
    result = plan(normalized, data, request, sensitivity=mixed_sensitivity, latency_table=mixed_table)
    assert set(result.plan.configuration.values()) == {"fp32"}
    assert result.run.search["chosen_by"].startswith("the float model")
    assert result.run.search["latency_table_reused"] is True  # measured for every layer, exclusions aside


@pytest.mark.slow
def test_latency_budget_drives_the_search_and_the_frontier_is_measured(mixed, mixed_table, mixed_sensitivity):
    normalized, data = mixed
    stale = dataclasses.replace(mixed_table, onnxruntime_version="0.0.0")
    request = PlanRequest(method="hawq_v2", max_latency_ms=1_000.0, max_frontier_points=3, **FAST)
    result = plan(normalized, data, request, sensitivity=mixed_sensitivity, latency_table=stale)
    search = result.run.search
    assert search["latency_table_reused"] is False  # another onnxruntime version: measured again
    assert LatencyTable.from_dict(search["latency_table"]).matches(mixed_table.key())
    assert result.frontier and all(p.measured is not None and p.latency_ms is not None for p in result.frontier)
    latencies = [p.latency_ms for p in result.frontier]
    assert latencies == sorted(latencies)
    assert result.plan.measured.latency.p50_ms <= 1_000.0 and result.meets_constraints


@pytest.mark.slow
def test_a_predicted_infeasible_latency_budget_is_refused_by_name(mixed, mixed_table, mixed_sensitivity):
    from planner.choose import NoFeasiblePlan

    normalized, data = mixed
    request = PlanRequest(method="hawq_v2", max_latency_ms=1e-6, **FAST)
    with pytest.raises(NoFeasiblePlan, match="predicted median latency") as raised:
        plan(normalized, data, request, sensitivity=mixed_sensitivity, latency_table=mixed_table)
    assert raised.value.kind == "max_latency_ms"


@pytest.mark.parametrize(("repeats", "runs_per_round", "min_rounds"), [(1, 1, 2), (3, 3, 2), (50, 5, 10), (51, 5, 11)])
def test_measured_configurations_are_timed_in_rounds_that_hold_latency_repeats(repeats, runs_per_round, min_rounds):
    timing = measurement_timing(
        PlanRequest(method="hawq_v2", latency_repeats=repeats, latency_batch_size=4, device="cuda:1")
    )
    assert (timing.runs_per_round, timing.min_rounds, timing.max_rounds) == (runs_per_round, min_rounds, 4 * min_rounds)
    assert timing.runs_per_round * timing.min_rounds >= repeats  # at least latency_repeats runs
    assert (timing.device, timing.batch_size) == ("cuda", 4)  # the table's settings otherwise (timing_for)

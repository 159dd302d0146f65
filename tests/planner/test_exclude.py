"""Exclusion lists and structural constants (planner.exclude): excluded layers stay fp32 in every
configuration the searches consider, on a trained digits MLP and a tiny detector with YOLOv8's DFL."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from planner.choose import minimum_cost
from planner.cost import layer_cost_table
from planner.exclude import (
    MAX_EXCLUDE_PATTERN_LENGTH,
    MAX_EXCLUDE_PATTERNS,
    STRUCTURAL_CONSTANT,
    Exclusion,
    exact_candidates,
    is_structural_constant,
    layer_candidates,
    match_patterns,
)
from planner.objective import Objective, uniform_within
from planner.plan import plan
from planner.predict import build_objective
from planner.quadratic import solve_quadratic
from planner.request import DEFAULT_CANDIDATES, PlanRequest
from sensitivity.examples import DigitsMLP, export_onnx, load_digits, train
from sensitivity.layers import find_layers
from sensitivity.normalize import normalize_model
from sensitivity.onnx_program import load_onnx
from sensitivity.results import InterLayerConfig
from sensitivity.run import compute_sensitivity

FAST = {"max_frontier_points": 2, "latency_repeats": 3, "latency_warmup": 1, "device": "cpu", "measure_uniform": False}
PROBES = {"trace_max_probes": 8, "trace_min_probes": 4}
THREE = ("fp32", "w8a8", "w4a8")


@pytest.fixture(scope="module")
def mlp():
    """Digits MLP (fc1 64->32, fc2 32->32, fc3 32->10), TorchScript export: nodes /fc1/Gemm, ..."""
    digits = load_digits()
    torch.manual_seed(0)  # the initial weights: unseeded, the frontier's length varied from 1 to 7 with test order
    model = train(DigitsMLP(), digits, epochs=3)
    proto = export_onnx(model, torch.from_numpy(digits.train_x[:1]))
    calibration = {"input": digits.train_x[:256], "labels": digits.train_y[:256]}
    evaluation = {"input": digits.test_x[:200], "labels": digits.test_y[:200]}
    return proto, calibration, evaluation


@pytest.fixture(scope="module")
def mlp_sensitivity(mlp):
    proto, calibration, _ = mlp
    config = InterLayerConfig(bits=(8, 4), trace_max_probes=8, trace_min_probes=4, device="cpu")
    return compute_sensitivity(load_onnx(proto), calibration, config)


def size_budget(proto: onnx.ModelProto, calibration, exclude: tuple[str, ...]) -> int:
    """Halfway between the cheapest configuration with the exclusions and the float model: the search
    must quantize the other layers."""
    table = layer_cost_table(proto, (1, *calibration["input"].shape[1:]))
    offered = layer_candidates(proto, THREE, exclude).offered
    return (minimum_cost(table, THREE, "size", offered) + minimum_cost(table, ("fp32",), "size")) // 2


@pytest.mark.slow
@pytest.mark.parametrize("method", ["hawq_v2", "interlayer"])
def test_an_excluded_layer_is_fp32_in_every_frontier_point_and_uniform_baseline(mlp, mlp_sensitivity, method):
    proto, calibration, evaluation = mlp
    request = PlanRequest(
        method=method,
        candidates=THREE,
        exclude=("fc2.weight",),
        max_size_bytes=size_budget(proto, calibration, ("fc2.weight",)),
        **{**FAST, "measure_uniform": method == "hawq_v2"},
    )
    result = plan(proto, calibration, request, evaluation=evaluation, sensitivity=mlp_sensitivity)

    points = [result.plan, *result.frontier, *result.uniform.values()]
    assert len(result.frontier) >= 2 and all(point.configuration["fc2.weight"] == "fp32" for point in points)
    assert result.plan.configuration["fc1.weight"] != "fp32"  # the budget needs the others quantized
    if result.uniform:  # "every layer at b" means every other layer: the exclusion holds there too
        assert result.uniform["w4a8"].configuration == {
            "fc1.weight": "w4a8",
            "fc2.weight": "fp32",
            "fc3.weight": "w4a8",
        }
    assert result.excluded == (Exclusion("fc2.weight", "/fc2/Gemm", "/fc2", "exclude pattern 'fc2.weight'", ("fp32",)),)
    document = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert document["excluded"] == [
        {
            "layer": "fc2.weight",
            "node_name": "/fc2/Gemm",
            "scope": "/fc2",
            "reason": "exclude pattern 'fc2.weight'",
            "candidates": ["fp32"],
        }
    ]
    assert document["layer_nodes"]["fc1.weight"] == {"node_name": "/fc1/Gemm", "scope": "/fc1"}
    assert document["request"]["exclude"] == ["fc2.weight"]


@pytest.mark.slow
def test_bisection_keeps_node_pattern_matches_fp32_at_every_step(mlp, mlp_sensitivity):
    """A node-name glob; max_drop 0 on the output cosine makes the search measure several steps. Without
    fp32 among the candidates, the excluded layer still stays fp32 while the others start at w8a8."""
    proto, calibration, evaluation = mlp
    request = PlanRequest(method="hawq_v2", search="bisection", max_drop=0.0, metric="cosine", exclude="/fc1/*", **FAST)
    result = plan(proto, calibration, request, evaluation=evaluation, sensitivity=mlp_sensitivity)
    assert len(result.frontier) >= 2
    assert all(point.configuration["fc1.weight"] == "fp32" for point in (result.plan, *result.frontier))
    assert "fc1.weight" not in result.run.search["order"]
    assert [e.reason for e in result.excluded] == ["exclude pattern '/fc1/*'"]

    without_fp32 = PlanRequest(
        method="hawq_v2", search="bisection", max_drop=100.0, candidates=("w8a8", "w4a8"), exclude="/fc1/*", **FAST
    )
    result = plan(proto, calibration, without_fp32, evaluation=evaluation, sensitivity=mlp_sensitivity)
    assert result.plan.configuration == {"fc1.weight": "fp32", "fc2.weight": "w4a8", "fc3.weight": "w4a8"}
    assert result.run.search["high"] == "w8a8"


@pytest.mark.slow
def test_an_unmatched_pattern_is_a_value_error_naming_it_and_some_layers(mlp):
    proto, calibration, evaluation = mlp
    with pytest.raises(ValueError, match=r"\['fc9\*'\] match no layer.*'fc1.weight' \(node '/fc1/Gemm'\)"):
        plan(
            proto,
            calibration,
            PlanRequest(method="hawq_v2", exclude=("fc1.weight", "fc9*"), **FAST),
            evaluation=evaluation,
        )
    layers = find_layers(proto)
    assert match_patterns(layers, ["/fc?/Gemm", "fc1.weight"]) == {
        "fc1.weight": "/fc?/Gemm",
        "fc2.weight": "/fc?/Gemm",
        "fc3.weight": "/fc?/Gemm",
    }
    assert match_patterns(layers, []) == {}


@pytest.mark.slow
def test_the_quadratic_solver_and_the_dp_pick_only_offered_candidates(mlp, mlp_sensitivity):
    """The objective's per-layer candidates are the one mechanism: every solver respects them."""
    proto, _, _ = mlp
    table = layer_cost_table(proto, (1, 1, 8, 8))
    offered = layer_candidates(proto, DEFAULT_CANDIDATES, ["fc3.weight"]).offered
    objective = build_objective(mlp_sensitivity, table, DEFAULT_CANDIDATES, proto, offered=offered)
    assert objective.candidates == (DEFAULT_CANDIDATES, DEFAULT_CANDIDATES, ("fp32",))
    cheapest = minimum_cost(table, DEFAULT_CANDIDATES, "size", offered) - table.fixed_size_bytes
    result = solve_quadratic(objective, "size", cheapest)
    assert objective.configuration(result.choice)["fc3.weight"] == "fp32"
    assert objective.uniform("w4") == {"fc1.weight": "w4", "fc2.weight": "w4", "fc3.weight": "fp32"}


def test_uniform_within_falls_back_to_fp32_then_the_first_candidate():
    offered = {"a": ("fp32", "w8"), "b": ("fp32",), "c": ("w8a8", "w4a8")}
    assert uniform_within(offered, "w8") == {"a": "w8", "b": "fp32", "c": "w8a8"}
    objective = Objective(
        layers=("a", "b"), candidates=(("fp32", "w4"), ("fp32",)), omega=[[0, 1], [0]], costs={"size": [[4, 1], [4]]}
    )
    assert objective.uniform("w4") == {"a": "w4", "b": "fp32"}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("fc1.weight, /fc2/*,,fc1.weight", ("fc1.weight", "/fc2/*")),
        (["a", "b", "a"], ("a", "b")),
        ((), ()),
        ("", ()),
    ],
)
def test_exclude_takes_a_list_or_a_comma_separated_string(value, expected):
    request = PlanRequest(method="hawq_v2", exclude=value)
    assert request.exclude == expected
    assert PlanRequest.from_dict(json.loads(json.dumps(request.to_dict()))) == request


@pytest.mark.parametrize(
    "value",
    [
        None,
        5,
        {"a": 1},
        [""],
        [1],
        [["a"]],
        ["x" * (MAX_EXCLUDE_PATTERN_LENGTH + 1)],
        [f"layer{i}" for i in range(MAX_EXCLUDE_PATTERNS + 1)],
    ],
)
def test_bad_exclude_values_are_value_errors_naming_the_field(value):
    with pytest.raises(ValueError, match="exclude must be a list"):
        PlanRequest(method="hawq_v2", exclude=value)


def test_a_stored_request_without_exclude_loads_with_none():
    stored = {k: v for k, v in PlanRequest(method="hawq_v2").to_dict().items() if k != "exclude"}
    assert PlanRequest.from_dict(stored).exclude == ()


# ---------------------------------------------------------------- structural constants


class TinyDetector(nn.Module):
    """A stem, a box head of 4 sides × 16 bins, and YOLOv8's DFL: softmax over the bins, then a fixed
    1×1 Conv holding arange(16) that turns them into an expected distance."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.box = nn.Conv2d(8, 64, 1)
        self.dfl = nn.Conv2d(16, 1, 1, bias=False).requires_grad_(False)
        self.dfl.weight.data[:] = torch.arange(16, dtype=torch.float32).view(1, 16, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        boxes = self.box(torch.relu(self.stem(x)))
        n, _, h, w = boxes.shape
        bins = boxes.view(n, 4, 16, h * w).transpose(2, 1).softmax(1)  # [N, 16, 4, HW]
        return self.dfl(bins).view(n, 4, h * w)


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    x = np.random.default_rng(0).standard_normal((16, 3, 4, 4)).astype(np.float32)
    proto = export_onnx(TinyDetector(), torch.from_numpy(x[:1]), output_name="distances")
    return proto, {"input": x}


def test_a_fixed_arange_projection_is_a_structural_constant_kept_fp32(detector):
    proto, _ = detector
    arange = np.arange(16, dtype=np.float32).reshape(1, 16, 1, 1)
    assert is_structural_constant(arange) and not is_structural_constant(arange + 0.5)
    assert not is_structural_constant(np.ones((64, 64)))  # integers, but too many values to be a fixed projection
    # Q_8 per channel: scale 15/127, so 1 -> 8·15/127 ≈ 0.945; neither 8 nor 4 bits is exact
    assert exact_candidates(arange, 0, DEFAULT_CANDIDATES) == ("fp32",)
    # max |w| = 127: scale 1 at 8 bits, exact; 4 bits is not
    assert exact_candidates(np.arange(128, dtype=np.float32).reshape(1, 128), 0, DEFAULT_CANDIDATES) == (
        "fp32",
        "w8a8",
        "w8",
    )

    offered = layer_candidates(proto, DEFAULT_CANDIDATES)
    assert offered.offered == {
        "stem.weight": DEFAULT_CANDIDATES,
        "box.weight": DEFAULT_CANDIDATES,
        "dfl.weight": ("fp32",),
    }
    assert offered.exclusions == (Exclusion("dfl.weight", "/dfl/Conv", "/dfl", STRUCTURAL_CONSTANT, ("fp32",)),)


@pytest.mark.slow
def test_a_plan_never_offers_the_structural_constant_4_bits(detector):
    proto, calibration = detector
    request = PlanRequest(
        method="hawq_v2",
        candidates=("fp32", "w4a8", "w4"),
        max_size_bytes=size_budget_detector(proto),
        sensitivity_options=PROBES,
        **{**FAST, "measure_uniform": True},
    )
    result = plan(proto, calibration, request)
    points = [result.plan, *result.frontier, *result.uniform.values()]
    assert all(point.configuration["dfl.weight"] == "fp32" for point in points)
    assert any(point.configuration["box.weight"] != "fp32" for point in points)
    assert [(e.layer, e.reason) for e in result.excluded] == [("dfl.weight", STRUCTURAL_CONSTANT)]
    assert result.to_dict()["excluded"][0]["reason"] == "structural constant"


def size_budget_detector(proto: onnx.ModelProto) -> int:
    table = layer_cost_table(
        normalize_model(proto, opset=21).model, (1, 3, 4, 4)
    )  # as the plan sizes it (w4: opset 21)
    return (minimum_cost(table, ("w4",), "size") + minimum_cost(table, ("fp32",), "size")) // 2

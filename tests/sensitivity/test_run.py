"""The one verb: dispatch, calibration checks, serialization, reproducibility, ONNX = torch."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from typing import TypedDict

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sensitivity import (
    EigenConfig,
    InterLayerConfig,
    SensitivityResult,
    TorchProgram,
    TraceConfig,
    compute_sensitivity,
    predicted_loss_change,
)
from sensitivity.examples import DigitsCNN, export_onnx, load_digits
from sensitivity.run import resolve_device
from tests.sensitivity.helpers import TinyProblem, tiny_problem

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/sensitivity/conftest.py


class _Fast(TypedDict):
    batch_size: int
    device: str


FAST = _Fast(batch_size=12, device="cpu")


@pytest.fixture(scope="module")
def problem() -> TinyProblem:
    return tiny_problem()


def _without_timings(result: SensitivityResult) -> dict:
    """The result without what is measured in time or memory (the execution report's batch size and
    method are compared by the tests that need them)."""
    data = result.to_dict()
    data.pop("timings")
    data.pop("execution")
    return data


@pytest.mark.slow
@pytest.mark.parametrize(
    "config",
    [
        TraceConfig(seed=3, max_probes=16, **FAST),
        EigenConfig(seed=3, max_iterations=10, **FAST),
        InterLayerConfig(seed=3, bits=(8, 4), trace_max_probes=16, **FAST),
    ],
)
def test_each_config_runs_its_analysis_and_round_trips_through_json(problem: TinyProblem, config) -> None:
    result = compute_sensitivity(problem.program, problem.calibration, config)
    assert (result.traces is not None) == isinstance(config, (TraceConfig, InterLayerConfig))
    assert (result.eigenvalues is not None) == isinstance(config, EigenConfig)
    assert (result.interlayer is not None) == isinstance(config, InterLayerConfig)
    assert result.num_hvps > 0 and result.seed == 3 and result.num_samples == 24
    assert result.loss_kind == "cross_entropy" and result.loss > 0 and result.loss_reason.startswith("labels given")
    assert {"torch", "onnx", "onnxruntime", "mpq"} <= set(result.versions)
    assert result.device.startswith("cpu") and result.timings["total"] > 0
    assert [layer.name for layer in result.layers] == ["conv.weight", "fc1.weight", "fc2.weight"]
    text = json.dumps(result.to_dict(), allow_nan=False)  # plain JSON, no NaN/inf
    assert SensitivityResult.from_dict(json.loads(text)) == result


@pytest.mark.slow
def test_seeded_runs_reproduce_exactly(problem: TinyProblem) -> None:
    config = InterLayerConfig(seed=5, trace_max_probes=12, **FAST)
    first = compute_sensitivity(problem.program, problem.calibration, config)
    second = compute_sensitivity(problem.program, problem.calibration, config)
    assert _without_timings(first) == _without_timings(second)
    other = compute_sensitivity(problem.program, problem.calibration, dataclasses.replace(config, seed=6))
    assert first.traces != other.traces
    # G and g·Δ are deterministic; only Ω uses the traces (and so the probes).
    assert first.interlayer is not None and other.interlayer is not None
    assert first.interlayer.matrix == other.interlayer.matrix
    assert first.interlayer.gradient_terms == other.interlayer.gradient_terms
    assert first.interlayer.omega != other.interlayer.omega


@pytest.mark.slow
def test_progress_reports_phases_in_order(problem: TinyProblem) -> None:
    calls: list[tuple[str, float, str]] = []
    compute_sensitivity(
        problem.program,
        problem.calibration,
        InterLayerConfig(trace_max_probes=8, **FAST),
        progress=lambda *a: calls.append(a),
    )
    phases = [phase for phase, _, _ in calls]
    assert phases[0] == "budget" and phases[-1] == "done"
    assert phases.index("budget") < phases.index("prepare") < phases.index("traces") < phases.index("interlayer")
    traces = [message for phase, _, message in calls if phase == "traces" and "probes" in message]
    assert re.fullmatch(r"\d+ probes, worst SE/\|trace\| [0-9.]+ \(target 0.05\), ETA \d+ s", traces[-1])
    assert all(0.0 <= fraction <= 1.0 for _, fraction, _ in calls)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: {"labels": c["labels"]}, r"missing \['input'\]"),
        (lambda c: {**c, "mask": c["input"]}, r"unexpected \['mask'\]"),
        (lambda c: {**c, "labels": c["labels"][:-1]}, "different numbers of samples"),
        (lambda c: {**c, "labels": c["labels"] + 10}, r"labels must lie in \[0, 3\]"),
        (lambda c: {**c, "labels": c["labels"] - 10}, "non-negative"),
        (lambda c: {**c, "labels": c["labels"].astype(np.float32)}, "1-D integer array"),
        (lambda c: {"input": c["input"][:0], "labels": c["labels"][:0]}, "empty"),
        (lambda c: {**c, "input": c["input"].tolist()}, "must be a numpy array"),
    ],
)
def test_bad_calibration_is_named(problem: TinyProblem, change, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        compute_sensitivity(problem.program, change(problem.calibration), TraceConfig(**FAST))


def test_unregistered_config_type_is_a_type_error(problem: TinyProblem) -> None:
    @dataclasses.dataclass(frozen=True)
    class Unknown:
        device: str = "cpu"

    with pytest.raises(TypeError, match="no handler for Unknown"):
        compute_sensitivity(problem.program, problem.calibration, Unknown())  # type: ignore[arg-type]  # not a config: the error under test


def test_auto_device_is_cuda_only_when_available() -> None:
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


@pytest.mark.gpu
def test_cuda_matches_cpu(problem: TinyProblem) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    config = InterLayerConfig(seed=1, trace_max_probes=16, batch_size=12)
    gpu = compute_sensitivity(problem.program, problem.calibration, dataclasses.replace(config, device="cuda"))
    cpu = compute_sensitivity(problem.program, problem.calibration, dataclasses.replace(config, device="cpu"))
    assert gpu.device.startswith("cuda")
    assert gpu.interlayer is not None and cpu.interlayer is not None
    assert gpu.traces is not None and cpu.traces is not None
    assert np.allclose(gpu.interlayer.array(), cpu.interlayer.array(), rtol=1e-6, atol=1e-12)
    for a, b in zip(gpu.traces, cpu.traces):  # same probes (drawn on the CPU), float64 model
        assert a.trace == pytest.approx(b.trace, rel=1e-8)


def _folded(model: DigitsCNN) -> nn.Module:
    """The CNN with BatchNorm folded into the convolutions, as the ONNX export does."""
    fused = copy.deepcopy(model)
    fused.conv1 = torch.nn.utils.fusion.fuse_conv_bn_eval(fused.conv1, fused.bn1)
    fused.conv2 = torch.nn.utils.fusion.fuse_conv_bn_eval(fused.conv2, fused.bn2)
    # bn1/bn2 are typed BatchNorm2d on DigitsCNN: add_module replaces them with identities
    fused.add_module("bn1", nn.Identity())
    fused.add_module("bn2", nn.Identity())
    return fused


@pytest.mark.slow
def test_onnx_program_gives_the_torch_program_results() -> None:
    onnx_program = pytest.importorskip("sensitivity.onnx_program")
    torch.manual_seed(0)
    model = DigitsCNN().eval()
    for bn in (model.bn1, model.bn2):  # non-trivial statistics, so folding matters
        assert bn.running_mean is not None and bn.running_var is not None
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
    from_onnx = onnx_program.load_onnx(export_onnx(model, torch.zeros(1, 1, 8, 8)))
    from_torch = TorchProgram(_folded(model))
    assert [(layer.name, layer.op_type, layer.shape, layer.channel_axis) for layer in from_onnx.layers] == [
        (layer.name, layer.op_type, layer.shape, layer.channel_axis) for layer in from_torch.layers
    ]
    digits = load_digits()
    calibration = {"input": digits.train_x[:48], "labels": digits.train_y[:48]}
    config = InterLayerConfig(seed=2, trace_max_probes=8, batch_size=24, device="cpu")
    a = compute_sensitivity(from_onnx, calibration, config)
    b = compute_sensitivity(from_torch, calibration, config)
    assert a.loss == pytest.approx(b.loss, rel=1e-5)
    assert a.traces is not None and b.traces is not None
    assert a.interlayer is not None and b.interlayer is not None
    for x, y in zip(a.traces, b.traces):
        assert x.trace == pytest.approx(y.trace, rel=1e-4, abs=1e-6)
    assert np.allclose(
        a.interlayer.array(), b.interlayer.array(), rtol=1e-4, atol=1e-4 * np.abs(b.interlayer.array()).max()
    )
    everything_at_4: dict[str, int | None] = {layer.name: 4 for layer in a.layers}
    assert predicted_loss_change(a, everything_at_4) == pytest.approx(
        predicted_loss_change(b, everything_at_4), rel=1e-4
    )


@pytest.mark.slow
@pytest.mark.parametrize(("task", "loss_kind"), [("auto", "distill_cross_entropy"), ("regression", "distill_mse")])
def test_onnx_program_supports_both_hvp_methods(task: str, loss_kind: str) -> None:
    onnx_program = pytest.importorskip("sensitivity.onnx_program")
    torch.manual_seed(1)
    program = onnx_program.load_onnx(export_onnx(DigitsCNN().eval(), torch.zeros(1, 1, 8, 8)))
    digits = load_digits()
    calibration = {"input": digits.train_x[:32]}  # no labels: self-distillation to the argmax or the outputs
    traces = {}
    for method in ("double_backward", "forward_over_reverse"):
        config = TraceConfig(seed=0, max_probes=8, batch_size=16, device="cpu", hvp_method=method, task=task)
        result = compute_sensitivity(program, calibration, config)
        assert result.loss_kind == loss_kind and result.traces is not None
        traces[method] = [t.trace for t in result.traces]
    assert np.allclose(traces["double_backward"], traces["forward_over_reverse"], rtol=1e-4)


class _Regressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


@pytest.mark.slow
def test_regression_without_labels_has_zero_gradient_and_gauss_newton_g() -> None:
    torch.manual_seed(0)
    program = TorchProgram(_Regressor().double())
    calibration = {"input": np.random.default_rng(0).normal(size=(40, 3))}
    config = InterLayerConfig(bits=(8, 4, 2), trace_max_probes=16, task="regression", **FAST)
    result = compute_sensitivity(program, calibration, config)
    assert result.loss_kind == "distill_mse" and result.loss == 0.0
    assert result.interlayer is not None and result.traces is not None
    assert all(term == 0.0 for term in result.interlayer.gradient_terms)
    matrix = result.interlayer.array()
    assert np.linalg.eigvalsh((matrix + matrix.T) / 2).min() > -1e-10 * np.abs(matrix).max()  # G is a Gram matrix
    assert all(t.trace > 0 for t in result.traces)


_finite = st.floats(allow_nan=False, allow_infinity=False, width=64)


@given(
    traces=st.lists(st.tuples(_finite, st.floats(0, 1e6), st.integers(2, 1000)), min_size=1, max_size=4),
    eigen=st.tuples(_finite, st.integers(1, 100), st.booleans(), st.none() | st.floats(0, 1e3)),
    entries=st.lists(_finite, min_size=4, max_size=4),
)
@settings(max_examples=30, deadline=None)
def test_results_round_trip_through_json_for_any_values(traces, eigen, entries) -> None:
    from sensitivity import InterLayerTerms, LayerEigen, LayerInfo, LayerTrace

    names = [f"layer{i}.weight" for i in range(len(traces))]
    result = SensitivityResult(
        config=InterLayerConfig(bits=(8,)),
        layers=tuple(LayerInfo(n, "Gemm", (2, 3), 6, 0) for n in names),
        loss_kind="cross_entropy",
        loss_reason="labels given",
        loss=1.5,
        num_samples=10,
        traces=tuple(LayerTrace(n, 6, t, se, k) for n, (t, se, k) in zip(names, traces)),
        eigenvalues=(LayerEigen(names[0], *eigen),),
        interlayer=InterLayerTerms(
            labels=(("a", 8), ("b", 4)),
            matrix=((entries[0], entries[1]), (entries[2], entries[3])),
            gradient_terms=(entries[0], entries[1]),
            delta_norms_squared=(1.0, 2.0),
            omega=(entries[2], entries[3]),
            symmetry_error=0.0,
        ),
        timings={"total": 1.0},
        num_hvps=3,
        versions={"torch": torch.__version__},
        device="cpu",
    )
    assert SensitivityResult.from_dict(json.loads(json.dumps(result.to_dict(), allow_nan=False))) == result
    stored_before = {key: value for key, value in result.to_dict().items() if key != "loss_reason"}
    assert SensitivityResult.from_dict(stored_before).loss_reason == ""  # results stored before it was recorded


def _graph_model(nodes: list, weights: dict[str, np.ndarray], out: str = "y"):
    from onnx import TensorProto, helper, numpy_helper

    onnx_program = pytest.importorskip("sensitivity.onnx_program")
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
        [numpy_helper.from_array(value, name) for name, value in weights.items()],
    )
    return onnx_program.load_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_a_model_without_layers_is_refused_by_name() -> None:
    from onnx import helper

    program = _graph_model([helper.make_node("Relu", ["x"], ["y"])], {})
    with pytest.raises(ValueError, match="no quantizable layers"):
        compute_sensitivity(program, {"x": np.ones((4, 4), np.float32)}, TraceConfig(device="cpu"))


def test_non_finite_calibration_data_is_refused_naming_the_sample() -> None:
    from onnx import helper

    program = _graph_model([helper.make_node("MatMul", ["x", "w"], ["y"])], {"w": np.eye(4, dtype=np.float32)})
    data = np.ones((6, 4), np.float32)
    data[3, 1] = np.inf
    with pytest.raises(ValueError, match=r"'x' holds NaN or infinite values in 1 of 6 samples \(first: sample 3\)"):
        compute_sensitivity(program, {"x": data}, TraceConfig(device="cpu"))


@pytest.mark.slow
def test_a_loss_that_no_weight_moves_differentiably_is_an_error() -> None:
    """Round between the layer and the output: every trace is exactly 0, which ranks nothing."""
    from onnx import helper

    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Round", ["h"], ["y"])]
    program = _graph_model(nodes, {"w": np.eye(4, dtype=np.float32)})
    data = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    with pytest.raises(ValueError, match="trace is exactly 0"):
        compute_sensitivity(program, {"x": data}, TraceConfig(device="cpu", task="regression", max_probes=8))
    # one probe per pass takes the unbatched double backward, which must give H = 0 rather than fail
    single = TraceConfig(
        device="cpu",
        task="regression",
        max_probes=8,
        probes_per_pass=1,
        hvp_method="double_backward",
        memory_budget_mb=None,
    )
    with pytest.raises(ValueError, match="trace is exactly 0"):
        compute_sensitivity(program, {"x": data}, single)

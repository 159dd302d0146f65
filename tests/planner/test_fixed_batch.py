"""Models exported with a fixed batch dim (1, or any N) take calibration sets of any size: every
stage runs them on batches of exactly N (the last padded), and the figures equal those of the same
model with a dynamic batch dim."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from planner.evaluate import run_batched_outputs
from planner.export import check_inputs
from planner.latency import measure_latency
from planner.plan import plan
from planner.request import PlanRequest
from sensitivity.normalize import fixed_batch_size
from sensitivity.onnx_program import load_onnx
from sensitivity.results import TraceConfig
from sensitivity.run import compute_sensitivity


def mlp(batch: int | None, seed: int = 0) -> onnx.ModelProto:
    """x [batch, 4] -> MatMul -> Relu -> Reshape to a constant shape -> MatMul -> [batch, 3]. With a
    fixed batch the Reshape's shape holds it, as exporters write it: no other batch size runs."""
    rng = np.random.default_rng(seed)
    weights = [
        numpy_helper.from_array(rng.normal(size=shape).astype(np.float32), name)
        for name, shape in (("fc1.weight", (4, 8)), ("fc2.weight", (8, 3)))
    ]
    shape = numpy_helper.from_array(np.array([batch or -1, 8], np.int64), "shape")
    nodes = [
        helper.make_node("MatMul", ["x", "fc1.weight"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Reshape", ["r", "shape"], ["f"]),
        helper.make_node("MatMul", ["f", "fc2.weight"], ["y"]),
    ]
    dim = batch or "batch"
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [dim, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [dim, 3])],
        [*weights, shape],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def samples(count: int) -> np.ndarray:
    return np.random.default_rng(1).normal(size=(count, 4)).astype(np.float32)


def test_the_fixed_batch_is_read_from_every_input():
    assert fixed_batch_size(mlp(1)) == 1 and fixed_batch_size(mlp(2)) == 2 and fixed_batch_size(mlp(None)) is None


@pytest.mark.slow
@pytest.mark.parametrize("fixed", [1, 2])
def test_sensitivity_of_a_fixed_batch_model_equals_the_dynamic_one(fixed: int):
    """5 samples: batches of exactly ``fixed`` (the last padded, its padding not counted) give the
    traces the dynamic model gives in batches of the same samples."""
    calibration = {"x": samples(5)}
    config = TraceConfig(seed=0, max_probes=8, batch_size=fixed, device="cpu", task="regression")
    dynamic = compute_sensitivity(load_onnx(mlp(None)), calibration, config)
    result = compute_sensitivity(load_onnx(mlp(fixed)), calibration, dataclasses.replace(config, batch_size=256))
    assert result.num_samples == 5 and result.loss == pytest.approx(dynamic.loss, rel=1e-6)
    assert result.traces is not None and dynamic.traces is not None
    for ours, theirs in zip(result.traces, dynamic.traces, strict=True):
        assert ours.trace == pytest.approx(theirs.trace, rel=1e-5)


def test_onnxruntime_runs_take_any_number_of_samples():
    calibration = {"x": samples(5)}
    fixed_bytes = mlp(1).SerializeToString()
    assert check_inputs(mlp(1), calibration).keys() == {"x"}  # 5 samples for a batch-1 model
    outputs = run_batched_outputs(fixed_bytes, calibration, batch_size=256)[0]
    expected = run_batched_outputs(mlp(None).SerializeToString(), calibration, batch_size=256)[0]
    assert outputs.shape == (5, 3) and np.allclose(outputs, expected, atol=1e-6)
    assert measure_latency(fixed_bytes, calibration, device="cpu", warmup=1, repeats=2, batch_size=8).batch_size == 1


@pytest.mark.slow
@pytest.mark.parametrize("fixed", [1, 4])
def test_a_plan_on_a_fixed_batch_model_with_18_samples(fixed: int):
    """The review's case: a fixed batch of 1 refused a calibration set of 16 samples; a fixed batch of 4
    failed the exporter's check that the float model runs, which fed it one sample."""
    calibration = {"x": samples(18)}
    request = PlanRequest(
        candidates=("fp32", "w8a8"),
        max_size_bytes=10**6,
        measure_uniform=False,
        max_frontier_points=2,
        latency_repeats=2,
        latency_warmup=1,
        device="cpu",
    )  # the default method, measured: every export and onnxruntime pass runs in chunks of the fixed batch
    result = plan(mlp(fixed), calibration, request)
    assert result.plan.measured is not None and result.plan.measured.num_samples == 18
    assert result.plan.measured.latency is not None and result.plan.measured.latency.batch_size == fixed

"""Inputs whose samples are not on axis 0, and inputs shared by every sample, through the planner:
input checks, export (calibration reader and artifact check), evaluation, latency and a whole plan,
on a silero-vad-like model (x [N, 6], state [2, N, 4], a rank-0 int64 sample rate)."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

from planner.evaluate import evaluate, run_batched_outputs
from planner.export import ArrayCalibrationReader, check_inputs, export_model, read_plan
from planner.latency import _take, measure_latency
from planner.plan import plan
from planner.request import PlanRequest
from tests.models import loose_data, loosely_declared_stateful_model, stateful_data, stateful_onnx_model

SAMPLES = 20
AXES = {"x": 0, "state": 1, "sr": None}
FAST = {
    "measure_uniform": False,
    "max_frontier_points": 2,
    "latency_repeats": 3,
    "latency_warmup": 1,
    "device": "cpu",
}  # the default method, measured: each layer's export runs on the user's sample axes
# Every layer demoted to w4a8 if the drop allows (it does: 100 pp): the plan quantizes. (A size budget
# would not: on a model this small the Q/DQ nodes weigh more than the weights they shrink.)
QUANTIZE = {"search": "bisection", "max_drop": 100.0}


def float_outputs(data: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(stateful_onnx_model().SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, data)


def test_check_inputs_takes_each_axis_and_a_shared_scalar():
    data = {**stateful_data(SAMPLES), "labels": np.zeros(SAMPLES, np.int64)}
    assert check_inputs(stateful_onnx_model(), data).keys() == {"x", "state", "sr"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda d: {**d, "sr": np.full(SAMPLES, 16000, np.int64)},
            r"'sr' has shape \(20,\), the model expects rank 0 \(\[\], shared by every sample\): give one value",
        ),
        (
            lambda d: {**d, "state": np.array(0.5, np.float32)},
            r"'state' has shape \(\), the model expects rank 3 \(\[2, \?, 4\], samples on axis 1\); "
            r"'state' has no samples on axis 1",
        ),
        (
            lambda d: {**d, "state": np.ascontiguousarray(d["state"].transpose(1, 0, 2))},
            r"'state' has shape \(20, 2, 4\), the model expects \[2, \?, 4\] \(samples on axis 1\)",
        ),
        (
            lambda d: {**d, "state": d["state"][:, :7]},
            r"different numbers of samples: 'x' 20 \(axis 0 of shape \(20, 6\)\), 'state' 7 \(axis 1 of shape \(2, 7, 4\)\)",
        ),
        (
            lambda d: {**d, "x": d["x"][:0], "state": d["state"][:, :0]},
            r"'x' has no samples on axis 0 \(shape \(0, 6\)\)",
        ),
    ],
)
def test_wrong_data_is_named_with_its_shape_and_axis(change, message):
    with pytest.raises(ValueError, match=message):
        check_inputs(stateful_onnx_model(), change(stateful_data(SAMPLES)), what="calibration set")


def test_the_calibration_reader_cuts_the_state_on_its_axis():
    reader = ArrayCalibrationReader(stateful_data(SAMPLES), 8, axes=AXES)
    batches = list(iter(reader.get_next, None))
    assert [batch["state"].shape for batch in batches] == [(2, 8, 4), (2, 8, 4), (2, 4, 4)]
    assert all(batch["sr"].shape == () for batch in batches) and len(reader) == 3


def test_export_evaluation_and_latency_run_on_every_axis():
    data = stateful_data(SAMPLES)
    exported = export_model(
        stateful_onnx_model(), {"fc1.weight": "w8a8", "fc2.weight": "w4"}, data, calibration_batch_size=8
    )
    assert read_plan(exported.model_bytes)["calibration"]["samples"] == SAMPLES
    session = ort.InferenceSession(exported.model_bytes, providers=["CPUExecutionProvider"])
    y, state = session.run(None, stateful_data(5, seed=9))  # the artifact takes the scalar as it is
    assert y.shape == (5, 3) and state.shape == (2, 5, 4)

    result = evaluate(exported, stateful_onnx_model().SerializeToString(), data, batch_size=3)
    assert result.num_samples == SAMPLES and result.metric_name == "top1_agreement" and result.baseline == 100.0
    assert result.fidelity.cosine_similarity > 0.9
    # batches of 3 along the state's axis 1 give the outputs of one whole run
    batched = run_batched_outputs(stateful_onnx_model().SerializeToString(), data, 3, first_only=True)[0]
    np.testing.assert_allclose(batched, float_outputs(data)[0], rtol=1e-5, atol=1e-6)

    for batch_size in (4, 32):  # fewer samples than 32: tiled cyclically along each sample axis
        latency = measure_latency(exported.model_bytes, data, device="cpu", warmup=1, repeats=2, batch_size=batch_size)
        assert latency.batch_size == batch_size and latency.p50_ms > 0


def test_the_latency_batch_tiles_samples_on_their_axis_and_feeds_shared_inputs_whole():
    state = stateful_data(3)["state"]
    np.testing.assert_array_equal(_take(state, 5, 1), state[:, [0, 1, 2, 0, 1]])
    assert _take(np.array(16000, np.int64), 5, None).shape == ()


@pytest.mark.slow
def test_a_quantized_plan_exports_an_artifact_that_runs_with_the_scalar():
    data = stateful_data(SAMPLES)
    request = PlanRequest(**QUANTIZE, **FAST)
    result = plan(stateful_onnx_model(), data, request)
    assert result.meets_constraints
    assert set(result.plan.configuration.values()) != {"fp32"}
    assert result.plan.measured.num_samples == SAMPLES and result.sensitivity["num_samples"] == SAMPLES
    fresh = stateful_data(6, seed=4, rate=8000)
    outputs = ort.InferenceSession(result.artifact_bytes, providers=["CPUExecutionProvider"]).run(None, fresh)
    for out, reference in zip(outputs, float_outputs(fresh), strict=True):
        assert out.shape == reference.shape
        cosine = np.dot(out.ravel(), reference.ravel()) / (np.linalg.norm(out) * np.linalg.norm(reference))
        assert cosine > 0.95


@pytest.mark.slow
def test_a_plan_takes_the_users_axes_where_the_declared_shapes_do_not_say():
    model, data = loosely_declared_stateful_model(), loose_data(SAMPLES)
    with pytest.raises(ValueError, match=r"different numbers of samples: 'x' 20 .*'state' 2 .*'sr' 1"):
        plan(model, data, PlanRequest(**QUANTIZE, **FAST))
    request = PlanRequest(**QUANTIZE, sample_axes={"state": 1, "sr": None}, **FAST)
    result = plan(model, data, request)  # opset 17 -> 21 for w4: the upgrade is checked on the user's axes
    assert result.run.normalization["upgrade_check"]["samples"] == 8
    assert result.meets_constraints and result.plan.measured.num_samples == SAMPLES
    assert json.loads(json.dumps(result.to_dict()))["request"]["sample_axes"] == {"state": 1, "sr": None}


def test_the_request_carries_sample_axes_through_json():
    request = PlanRequest(**QUANTIZE, sample_axes={"state": 1, "sr": None})
    assert PlanRequest.from_dict(json.loads(json.dumps(request.to_dict()))) == request
    assert PlanRequest().sample_axes == {}
    with pytest.raises(ValueError, match=r"sample_axes names \['mask'\]"):
        plan(stateful_onnx_model(), stateful_data(SAMPLES), PlanRequest(sample_axes={"mask": 0}, **FAST))

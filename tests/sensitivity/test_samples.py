"""Per-input sample axes (sensitivity.samples): inputs whose samples lie on another axis than 0
(a recurrent state [2, batch, 4]) and inputs shared by every sample (a rank-0 sample rate), read off
the declared shapes or given by the user, and the sensitivity analysis over them."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from sensitivity.losses import CalibrationLoss
from sensitivity.normalize import fixed_batch_size, normalize_model
from sensitivity.onnx_program import load_onnx
from sensitivity.results import TraceConfig
from sensitivity.run import compute_sensitivity
from sensitivity.samples import (
    check_sample_axes,
    fixed_batch,
    input_sample_axes,
    sample_count,
    take_samples,
)
from tests.models import loose_data, loosely_declared_stateful_model, stateful_data, stateful_onnx_model

SAMPLES = 20
# Fixed probes and HVP method, no memory adaptation: two runs differ only in how the set is batched.
TRACES = {
    "device": "cpu",
    "memory_budget_mb": None,
    "hvp_method": "double_backward",
    "min_probes": 6,
    "max_probes": 6,
    "seed": 3,
}


def one_input_model(dims: list[int | str | None] | None, elem_type: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """An Identity model whose one input ``x`` is declared with ``dims`` (None: no shape at all)."""
    x = helper.make_tensor_value_info("x", elem_type, dims)
    y = helper.make_tensor_value_info("y", elem_type, None)
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "one", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_axes_are_read_off_the_declared_shapes():
    assert input_sample_axes(stateful_onnx_model()) == {"x": 0, "state": 1, "sr": None}
    assert input_sample_axes(one_input_model([-1, 3, -1, -1])) == {"x": 0}  # paddle2onnx writes -1
    assert input_sample_axes(one_input_model([1, 1, 64, 192])) == {"x": 0}  # no dynamic dim: a fixed batch
    # ddddocr's [1, 1, 64, image_width]: a batch of 1 with a dynamic width, not samples along the width
    assert input_sample_axes(one_input_model([1, 1, 64, "image_width"])) == {"x": 0}
    assert fixed_batch_size(one_input_model([1, 1, 64, "image_width"])) == 1
    assert input_sample_axes(one_input_model(None)) == {"x": 0}  # undeclared: axis 0
    assert input_sample_axes(loosely_declared_stateful_model()) == {"x": 0, "state": 0, "sr": 0}


def test_shared_inputs_do_not_decide_the_fixed_batch():
    assert fixed_batch_size(stateful_onnx_model()) is None  # the batch is dynamic; state's 2 is no batch
    fixed = stateful_onnx_model()
    for value in fixed.graph.input[:2]:  # x [1, 6], state [2, 1, 4]: exported with batch 1
        dims = value.type.tensor_type.shape.dim
        dims[1 if value.name == "state" else 0].dim_value = 1
    assert input_sample_axes(fixed, {"state": 1}) == {"x": 0, "state": 1, "sr": None}
    assert fixed_batch(fixed, {"state": 1}) == 1


def test_the_user_overrides_the_declared_axes():
    model = loosely_declared_stateful_model()
    assert input_sample_axes(model, {"state": 1, "sr": None}) == {"x": 0, "state": 1, "sr": None}
    assert input_sample_axes(stateful_onnx_model(), {"state": 0}) == {"x": 0, "state": 0, "sr": None}
    with pytest.raises(ValueError, match=r"sample_axes names \['mask'\], which are not inputs.*'x', 'state', 'sr'"):
        input_sample_axes(model, {"mask": 0})
    with pytest.raises(ValueError, match=r"sample axis 3 of input 'state' is out of range: .*\[2, \?, 4\] has rank 3"):
        input_sample_axes(stateful_onnx_model(), {"state": 3})
    with pytest.raises(ValueError, match=r"sample axis 0 of input 'sr' is out of range: its declared shape \[\]"):
        input_sample_axes(stateful_onnx_model(), {"sr": 0})


@pytest.mark.parametrize(
    "value",
    [
        [("state", 1)],
        {"state": True},
        {"state": -1},
        {"state": "1"},
        {"state": 1.0},
        {1: 0},
        {"": 0},
        {"state": 256},
        {f"x{k}": 0 for k in range(257)},
    ],
)
def test_bad_sample_axes_are_value_errors(value):
    with pytest.raises(ValueError, match="sample_axes must map"):
        check_sample_axes(value)


def test_counting_and_slicing_follow_each_axis():
    data = {**stateful_data(SAMPLES), "labels": np.arange(SAMPLES)}
    axes = input_sample_axes(stateful_onnx_model())
    assert sample_count(data, axes) == SAMPLES  # labels (not an input) on axis 0; sr does not count
    rows = np.array([3, 3, 7])  # as padded_rows pads a fixed batch
    taken = take_samples(data, rows, axes)
    np.testing.assert_array_equal(taken["state"], data["state"][:, rows])
    np.testing.assert_array_equal(taken["x"], data["x"][rows])
    np.testing.assert_array_equal(taken["labels"], rows)
    assert taken["sr"] is data["sr"]  # shared: passed on unchanged
    assert take_samples(data, slice(2, 5), axes)["state"].shape == (2, 3, 4)


def test_counts_that_disagree_or_missing_sample_axes_are_named():
    data, axes = stateful_data(SAMPLES), {"x": 0, "state": 1, "sr": None}
    with pytest.raises(
        ValueError,
        match=r"different numbers of samples: 'x' 20 \(axis 0 of shape \(20, 6\)\), "
        r"'state' 19 \(axis 1 of shape \(2, 19, 4\)\)",
    ):
        sample_count({**data, "state": data["state"][:, 1:]}, axes)
    with pytest.raises(ValueError, match=r"'state' has shape \(\), but holds its samples on axis 1"):
        sample_count({**data, "state": np.array(0.5, np.float32)}, axes)
    with pytest.raises(ValueError, match="no array holds samples"):
        sample_count({"sr": data["sr"]}, axes)


def test_the_interpreter_matches_onnxruntime_with_a_shared_scalar():
    model, data = stateful_onnx_model(), stateful_data(5, rate=8000)
    program = load_onnx(model)
    assert program.sample_axes == {"x": 0, "state": 1, "sr": None}
    inputs = {name: torch.from_numpy(np.asarray(array)) for name, array in data.items()}
    assert inputs["sr"].dim() == 0
    outputs = program.forward(dict(program.layer_weights), inputs)
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, data)
    for out, reference in zip(outputs, expected, strict=True):
        np.testing.assert_allclose(out.numpy(), reference, rtol=1e-5, atol=1e-6)


def test_the_loss_feeds_the_scalar_as_a_0d_tensor_and_cuts_the_state_on_axis_1():
    loss = CalibrationLoss(load_onnx(stateful_onnx_model()), stateful_data(SAMPLES), 7, torch.device("cpu"))
    assert [batch.inputs["state"].shape for batch in loss.batches] == [(2, 7, 4), (2, 7, 4), (2, 6, 4)]
    assert all(batch.inputs["sr"].shape == () and batch.inputs["sr"].dtype == torch.int64 for batch in loss.batches)
    assert all(batch.inputs["x"].dtype == torch.float32 for batch in loss.batches)
    assert loss.num_samples == SAMPLES and loss.kind == "distill_normalized_mse"  # y and stateN


def test_traces_do_not_depend_on_how_the_set_is_batched():
    program, data = load_onnx(stateful_onnx_model()), stateful_data(SAMPLES)
    results = [compute_sensitivity(program, data, TraceConfig(batch_size=size, **TRACES)) for size in (3, 7)]
    three, seven = ([trace.trace for trace in result.traces] for result in results)
    assert all(trace > 0 for trace in three)
    np.testing.assert_allclose(three, seven, rtol=1e-4)
    assert results[0].loss == pytest.approx(results[1].loss, rel=1e-4, abs=1e-12)
    assert results[0].num_samples == SAMPLES


def test_user_axes_reach_the_program_and_the_analysis():
    model, data = loosely_declared_stateful_model(), loose_data(SAMPLES)
    with pytest.raises(ValueError, match=r"different numbers of samples: 'x' 20 .*'state' 2 .*'sr' 1"):
        compute_sensitivity(load_onnx(model), data, TraceConfig(batch_size=7, **TRACES))
    program = load_onnx(model, sample_axes={"state": 1, "sr": None})
    assert program.sample_axes == {"x": 0, "state": 1, "sr": None}
    assert program.to("cpu").sample_axes == program.sample_axes
    declared = compute_sensitivity(
        load_onnx(stateful_onnx_model()), stateful_data(SAMPLES), TraceConfig(batch_size=7, **TRACES)
    )
    given = compute_sensitivity(program, data, TraceConfig(batch_size=7, **TRACES))
    np.testing.assert_allclose([t.trace for t in given.traces], [t.trace for t in declared.traces], rtol=1e-6)


def test_bad_calibration_names_the_input_and_its_axis():
    program, data = load_onnx(stateful_onnx_model()), stateful_data(SAMPLES)
    config = TraceConfig(batch_size=7, **TRACES)
    with pytest.raises(ValueError, match=r"'state' 20 \(axis 1 of shape \(2, 20, 4\)\), 'labels' 19"):
        compute_sensitivity(program, {**data, "labels": np.zeros(SAMPLES - 1, np.int64)}, config)
    bad_state = data["state"].copy()
    bad_state[1, 4, 2] = np.nan
    with pytest.raises(
        ValueError, match=r"'state' holds NaN or infinite values in 1 of 20 samples \(first: sample 4\)"
    ):
        compute_sensitivity(program, {**data, "state": bad_state}, config)


def test_an_opset_upgrade_is_checked_on_the_first_samples_of_each_axis():
    data = stateful_data(SAMPLES)
    normalized = normalize_model(stateful_onnx_model(), opset=21, samples=data)
    assert normalized.upgraded and normalized.upgrade_check.samples == 8
    given = normalize_model(
        loosely_declared_stateful_model(), opset=21, samples=loose_data(SAMPLES), sample_axes={"state": 1, "sr": None}
    )
    assert given.upgrade_check.samples == 8 and given.upgrade_check.max_abs_difference == 0.0


@pytest.mark.slow
def test_per_sample_losses_group_each_output_on_its_own_sample_axis():
    """stateN [2, n, 4] holds its samples on axis 1: each sample's loss takes its own slice, so the
    per-sample losses average to the batch loss and the inter-layer analysis (which needs them for
    the gradient terms' errors) runs; it failed on a shape mismatch (8 samples against 2)."""
    from sensitivity.results import InterLayerConfig

    program = load_onnx(stateful_onnx_model())
    loss = CalibrationLoss(program, stateful_data(9), batch_size=4, device=torch.device("cpu"))
    assert loss.kind == "distill_normalized_mse" and loss.output_axes == (0, 1)
    shifted = {name: weight + 0.05 for name, weight in loss.weights0.items()}
    for batch in loss.batches:
        per_sample = loss.sample_losses(shifted, batch)
        assert per_sample.shape == (len(batch.inputs["x"]),)
        assert float(per_sample.mean()) == pytest.approx(float(loss.batch_loss(shifted, batch)), rel=1e-5)
    result = compute_sensitivity(
        program, stateful_data(9), InterLayerConfig(bits=(8,), trace_max_probes=4, trace_min_probes=4, device="cpu")
    )
    assert result.interlayer is not None and len(result.layers) == 2

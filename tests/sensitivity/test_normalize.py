"""The normalisation step (``sensitivity.normalize``) on small synthetic models, one quirk each.

The same quirks in real exports (PP-OCR from paddle2onnx, a quantized ddddocr model) are tested in
``tests/sensitivity/test_normalize_zoo.py``.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from planner.export import check_inputs
from sensitivity.layers import find_layers
from sensitivity.normalize import (
    PROMOTE_MIN_ELEMENTS,
    UPGRADE_CHECK_SAMPLES,
    AlreadyQuantizedError,
    BatchNormFoldError,
    OpsetUpgradeError,
    check_upgrade,
    normalize_model,
    static_dims,
)
from sensitivity.onnx_program import check_supported, load_onnx
from tests.models import (
    constant_node,
    conv_batchnorm_model,
    paddle_style_model,
    scaled_weight,
    tiny_onnx_model,
)


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def _x(count: int = 4) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((count, 3, 8, 8)).astype(np.float32)


# --- Constant nodes -> initializers ------------------------------------------------------------


def test_constant_weights_become_initializers_named_by_their_output():
    model = paddle_style_model()
    before = model.SerializeToString()
    normalized = normalize_model(model)
    assert find_layers(model) == []
    assert [layer.name for layer in find_layers(normalized.model)] == ["conv.w"]
    assert normalized.promoted_constants == ("conv.w", "conv.b")
    assert [node.op_type for node in normalized.model.graph.node] == ["Constant", "Conv", "Reshape"]
    assert model.SerializeToString() == before, "the given proto is never modified"
    np.testing.assert_array_equal(_run(normalized.model, {"x": _x()})[0], _run(model, {"x": _x()})[0])


def test_the_promotion_threshold_keeps_short_vectors_as_nodes():
    """8 channels of bias are data (promoted); a 7-element vector stays a node like a shape would."""
    assert PROMOTE_MIN_ELEMENTS == 8
    short = normalize_model(paddle_style_model(bias_channels=7))
    assert short.promoted_constants == ("conv.w",)
    assert normalize_model(paddle_style_model(bias_channels=8)).promoted_constants == ("conv.w", "conv.b")


def test_a_constant_that_is_a_graph_output_stays_a_node():
    graph = helper.make_graph(
        [constant_node("table", np.ones((4, 4), np.float32))],
        "g",
        [],
        [helper.make_tensor_value_info("table", TensorProto.FLOAT, [4, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert normalize_model(model).promoted_constants == ()


def test_the_interpreter_runs_the_normalised_model_as_onnxruntime_does():
    model = paddle_style_model()
    program = load_onnx(model)  # normalises first
    assert [layer.name for layer in program.layers] == ["conv.w"]
    assert program.normalization.promoted_constants == ("conv.w", "conv.b")
    import torch

    with torch.no_grad():
        ours = program.forward(dict(program.layer_weights), {"x": torch.from_numpy(_x())})[0].numpy()
    np.testing.assert_allclose(ours, _run(model, {"x": _x()})[0], rtol=1e-5, atol=1e-5)


# --- non-positive dims -------------------------------------------------------------------------


def test_dims_written_as_minus_one_or_zero_are_dynamic():
    value = helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 0, 3, "height", None])
    assert static_dims(value) == [None, None, 3, None, None]
    assert static_dims(helper.make_tensor_value_info("s", TensorProto.FLOAT, None)) is None


def test_normalisation_clears_minus_one_dims_and_says_so():
    normalized = normalize_model(paddle_style_model())
    assert normalized.dynamic_dims == ("x[0]", "y[0]")
    assert static_dims(normalized.model.graph.input[0]) == [None, 3, 8, 8]
    assert any("x[0]" in line for line in normalized.changes())


def test_input_checks_take_any_batch_for_a_minus_one_dim_and_still_check_fixed_dims():
    model = paddle_style_model()
    assert check_inputs(model, {"x": _x(5)})["x"].shape == (5, 3, 8, 8)
    wrong = np.zeros((5, 3, 8, 9), np.float32)
    with pytest.raises(ValueError, match=r"the model expects \[\?, 3, 8, 8\]"):
        check_inputs(model, {"x": wrong})


# --- already quantized ---------------------------------------------------------------------------


def _quantized_model(node: onnx.NodeProto, initializers: list[onnx.TensorProto]) -> onnx.ModelProto:
    graph = helper.make_graph(
        [node],
        "q",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        initializers,
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )


_W8 = numpy_helper.from_array(np.ones((4, 4), np.int8), "w_q")
_SCALE = numpy_helper.from_array(np.array(0.1, np.float32), "w_scale")
QUANTIZED = {
    "MatMulInteger": (helper.make_node("MatMulInteger", ["x", "w_q"], ["y"], name="mm"), [_W8], "MatMulInteger"),
    "DequantizeLinear on a weight": (
        helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["y"], name="dq"),
        [_W8, _SCALE],
        "DequantizeLinear on a weight",
    ),
    "com.microsoft MatMulNBits": (
        helper.make_node(
            "MatMulNBits",
            ["x", "w_q", "w_scale"],
            ["y"],
            name="nbits",
            domain="com.microsoft",
            K=4,
            N=4,
            bits=4,
            block_size=16,
        ),
        [_W8, _SCALE],
        "com.microsoft::MatMulNBits",
    ),
    "QLinearConv": (helper.make_node("QLinearConv", ["x"] * 8, ["y"], name="qconv"), [], "QLinearConv"),
}


@pytest.mark.parametrize("case", QUANTIZED)
def test_a_quantized_model_is_refused_as_quantized(case):
    node, initializers, label = QUANTIZED[case]
    model = _quantized_model(node, initializers)
    with pytest.raises(AlreadyQuantizedError, match=f"already quantized: it uses {label} \\(1 nodes, e.g. '") as error:
        normalize_model(model)
    assert "float model" in str(error.value)
    with pytest.raises(AlreadyQuantizedError):  # the op check names quantization too, not "unsupported ops"
        check_supported(model)


def test_a_dequantize_of_an_activation_is_not_a_quantized_weight():
    node = helper.make_node("DequantizeLinear", ["x", "w_scale"], ["y"], name="dq")
    assert normalize_model(_quantized_model(node, [_SCALE])).changed is False


# --- opset upgrade --------------------------------------------------------------------------------


def test_a_model_needing_no_change_is_returned_without_a_copy():
    model = tiny_onnx_model()
    normalized = normalize_model(model)
    assert normalized.model is model and not normalized.changed and normalized.changes() == []
    assert normalize_model(normalized) is normalized


def test_an_upgrade_is_checked_on_the_first_samples():
    model = tiny_onnx_model(opset=12)
    samples = {"x": np.random.default_rng(0).standard_normal((20, 8)).astype(np.float32), "labels": np.zeros(20)}
    normalized = normalize_model(model, opset=21, samples=samples)
    assert (normalized.source_opset, normalized.opset) == (12, 21)
    check = normalized.upgrade_check
    assert check is not None and check.samples == UPGRADE_CHECK_SAMPLES
    assert check.max_relative_difference < 1e-6  # measured: 0 (the same kernels)
    assert normalized.model.ir_version >= 10  # opset 21 needs IR 10
    assert "checked on 8 samples" in normalized.changes()[0]


def test_an_upgrade_without_samples_is_applied_and_reported_unchecked():
    normalized = normalize_model(tiny_onnx_model(opset=12), opset=13)
    assert normalized.opset == 13 and normalized.upgrade_check is None
    assert "not checked" in normalized.changes()[0]


def test_a_normalised_model_is_upgraded_further_keeping_its_record():
    first = normalize_model(paddle_style_model())
    second = normalize_model(first, opset=13, samples={"x": _x()})
    assert (second.source_opset, second.opset) == (12, 13)
    assert second.promoted_constants == ("conv.w", "conv.b") and second.upgrade_check is not None


def test_an_earlier_unchecked_upgrade_stays_reported_unchecked():
    unchecked = normalize_model(tiny_onnx_model(opset=10))  # 10 -> 11 without samples
    further = normalize_model(unchecked, opset=13, samples={"x": np.ones((2, 8), np.float32)})
    assert (further.source_opset, further.opset, further.upgrade_check) == (10, 13, None)
    assert "not checked" in further.changes()[0]


def test_the_upgrade_tolerance_is_relative_to_the_outputs():
    """Outputs around 1e4 that differ by ~1e-3 (float32 rounding at that scale) pass, where an
    absolute 1e-5 would have refused; a 1 % change of one weight is refused."""
    large = scaled_weight(tiny_onnx_model(), "fc2.weight", 1e4)
    samples = {"x": np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)}
    rounded = scaled_weight(large, "fc2.weight", 1 + 1e-7)
    check = check_upgrade(large, rounded, samples, (17, 17))
    assert check.max_abs_difference > 1e-5 and check.max_relative_difference < 1e-5
    with pytest.raises(OpsetUpgradeError, match="computes different outputs"):
        check_upgrade(large, scaled_weight(large, "fc2.weight", 1.01), samples, (17, 17))


def test_a_converter_that_changes_the_model_is_caught(monkeypatch):
    convert = onnx.version_converter.convert_version

    def perturbing(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
        return scaled_weight(convert(model, target), "fc2.weight", 1.0, offset=1e-2)

    monkeypatch.setattr(onnx.version_converter, "convert_version", perturbing)
    samples = {"x": np.ones((4, 8), np.float32)}
    with pytest.raises(OpsetUpgradeError, match="from opset 12 to 21 computes different outputs"):
        normalize_model(tiny_onnx_model(opset=12), opset=21, samples=samples)


def test_samples_lacking_an_input_are_named():
    with pytest.raises(ValueError, match=r"lack the model inputs \['x'\]"):
        normalize_model(tiny_onnx_model(opset=12), opset=13, samples={"image": np.ones((2, 8), np.float32)})


# --- BatchNormalization folded into the layer before it ----------------------------------------


def _x4(count: int = 12) -> np.ndarray:
    return np.random.default_rng(2).standard_normal((count, 4, 6, 6)).astype(np.float32)


def _ops(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


@pytest.mark.parametrize(
    ("op", "bias", "group"),
    [
        ("Conv", True, 1),
        ("Conv", False, 1),
        ("Conv", True, 2),
        ("ConvTranspose", False, 1),
        ("ConvTranspose", True, 2),
        ("Gemm", True, 1),
        ("Gemm", False, 1),
    ],
)
def test_a_batchnorm_is_folded_into_the_layer_before_it(op, bias, group):
    model = conv_batchnorm_model(op, bias=bias, group=group)
    before = model.SerializeToString()
    normalized = normalize_model(model, samples={"x": _x4()})
    assert "BatchNormalization" not in _ops(normalized.model) and op in _ops(normalized.model)
    assert [layer.name for layer in find_layers(normalized.model)] == ["layer.weight"]  # the layer name stays
    assert normalized.folded_batchnorms == ("layer.weight",)
    check = normalized.batchnorm_check
    assert check is not None and check.samples == UPGRADE_CHECK_SAMPLES and check.max_relative_difference < 1e-5
    [layer] = [node for node in normalized.model.graph.node if node.op_type == op]
    assert len(layer.input) == 3 and layer.output[0] == "n"  # a bias input; the BN's output name
    names = {init.name for init in normalized.model.graph.initializer}
    assert not any(name.startswith("bn.") for name in names), "the BN's vectors are dropped"
    assert model.SerializeToString() == before, "the given proto is never modified"
    np.testing.assert_allclose(
        _run(normalized.model, {"x": _x4()})[0], _run(model, {"x": _x4()})[0], rtol=1e-5, atol=1e-5
    )
    assert normalized.changes() == [
        f"folded 1 BatchNormalization nodes into the {op} before them: layer.weight; "
        f"checked on 8 samples: max relative difference {check.max_relative_difference:.3g}"
    ]
    assert normalized.to_dict()["folded_batchnorms"] == ["layer.weight"]


def test_the_folded_weight_is_the_weight_scaled_per_output_channel():
    model = conv_batchnorm_model("Conv", bias=True)
    arrays = {init.name: numpy_helper.to_array(init).astype(np.float64) for init in model.graph.initializer}
    scale = arrays["bn.weight"] / np.sqrt(arrays["bn.running_var"] + 1e-3)
    folded = {init.name: numpy_helper.to_array(init) for init in normalize_model(model).model.graph.initializer}
    np.testing.assert_allclose(folded["layer.weight"], arrays["layer.weight"] * scale[:, None, None, None], rtol=1e-6)
    expected_bias = (arrays["layer.bias"] - arrays["bn.running_mean"]) * scale + arrays["bn.bias"]
    np.testing.assert_allclose(folded["layer.bias"], expected_bias, rtol=1e-6)
    assert folded["layer.weight"].dtype == np.float32


def test_a_layer_whose_output_is_read_elsewhere_keeps_its_batchnorm():
    model = conv_batchnorm_model(extra_reader=True)
    normalized = normalize_model(model, samples={"x": _x4()})
    assert normalized.model is model and normalized.folded_batchnorms == ()
    assert "BatchNormalization" in _ops(normalized.model)


def test_a_shared_weight_keeps_its_batchnorm_and_its_outputs():
    """Folding into a weight another layer reads would change that layer too."""
    model = conv_batchnorm_model(shared_weight=True)
    normalized = normalize_model(model, samples={"x": _x4()})
    assert normalized.folded_batchnorms == () and "BatchNormalization" in _ops(normalized.model)
    np.testing.assert_array_equal(_run(normalized.model, {"x": _x4()})[0], _run(model, {"x": _x4()})[0])


def test_a_training_mode_batchnorm_is_not_folded():
    model = conv_batchnorm_model()
    [batchnorm] = [node for node in model.graph.node if node.op_type == "BatchNormalization"]
    batchnorm.attribute.append(helper.make_attribute("training_mode", 1))
    assert normalize_model(model).folded_batchnorms == ()


def test_batchnorm_vectors_from_constant_nodes_are_folded_after_their_promotion():
    """paddle2onnx writes the BN's vectors as Constant nodes too."""
    model = conv_batchnorm_model()
    vectors = [init for init in model.graph.initializer if init.name.startswith("bn.")]
    constants = [constant_node(init.name, numpy_helper.to_array(init)) for init in vectors]
    kept = [init for init in model.graph.initializer if not init.name.startswith("bn.")]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    nodes = [*constants, *model.graph.node]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    normalized = normalize_model(model, samples={"x": _x4()})
    assert normalized.folded_batchnorms == ("layer.weight",) and _ops(normalized.model) == ["Identity", "Conv", "Relu"]


def test_a_fold_without_samples_is_applied_and_reported_unchecked():
    normalized = normalize_model(conv_batchnorm_model())
    assert normalized.folded_batchnorms == ("layer.weight",) and normalized.batchnorm_check is None
    assert normalized.changes()[0].endswith("not checked (no samples given)")


def test_a_normalised_model_upgraded_further_keeps_its_fold_record():
    first = normalize_model(conv_batchnorm_model(), samples={"x": _x4()})
    second = normalize_model(first, opset=21, samples={"x": _x4()})
    assert second.folded_batchnorms == ("layer.weight",) and second.batchnorm_check == first.batchnorm_check


def test_a_fold_that_changes_the_outputs_is_caught(monkeypatch):
    import sensitivity.batchnorm

    scaled = sensitivity.batchnorm._scaled_weight
    monkeypatch.setattr(sensitivity.batchnorm, "_scaled_weight", lambda layer, w, s: scaled(layer, w, s) * 1.01)
    with pytest.raises(BatchNormFoldError, match=r"BatchNormalization folded .* computes different outputs"):
        normalize_model(conv_batchnorm_model(), samples={"x": _x4()})


_WITHOUT_TORCH = """
import sys, numpy as np
from onnx import TensorProto, helper, numpy_helper
from sensitivity.normalize import normalize_model
w = helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(np.ones((4, 4), np.float32)))
graph = helper.make_graph([w, helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 4])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 4])])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 10)])
assert normalize_model(model).promoted_constants == ("w",)
assert "torch" not in sys.modules, "torch was imported"
"""


@pytest.mark.slow
def test_normalising_never_imports_torch():
    """The upload inspector normalises in a process that must not import torch (sensitivity/__init__)."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TORCH], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_a_sensitivity_result_reports_what_normalisation_changed():
    from sensitivity.results import SensitivityResult, TraceConfig
    from sensitivity.run import compute_sensitivity

    program = load_onnx(paddle_style_model())
    config = TraceConfig(max_probes=2, min_probes=2, device="cpu", seed=0)
    result = compute_sensitivity(program, {"x": _x(8)}, config)
    assert [layer.name for layer in result.layers] == ["conv.w"]
    assert result.normalization["promoted_constants"] == 2 and result.normalization["dynamic_dims"] == ["x[0]", "y[0]"]
    assert SensitivityResult.from_dict(result.to_dict()).normalization == result.normalization


@pytest.mark.slow
def test_a_torch_cnn_exported_with_its_batchnorms_is_folded_to_the_torch_layer_names():
    """The digits CNN with its BNs left after the convs (what paddle2onnx writes) normalises to the
    graph the TorchScript exporter writes in eval mode: the same layers, the same outputs."""
    from tests.models import digits_onnx_with_batchnorm, trained_digits_onnx

    unfolded = digits_onnx_with_batchnorm()
    assert _ops(unfolded).count("BatchNormalization") == 2
    folded_by_torch, calibration, _ = trained_digits_onnx()
    normalized = normalize_model(unfolded, samples=calibration)
    assert normalized.folded_batchnorms == ("conv1.weight", "conv2.weight")
    assert "BatchNormalization" not in _ops(normalized.model)
    assert [layer.name for layer in find_layers(normalized.model)] == [
        layer.name for layer in find_layers(folded_by_torch)
    ]
    weights = {init.name: numpy_helper.to_array(init) for init in normalized.model.graph.initializer}
    torch_weights = {init.name: numpy_helper.to_array(init) for init in folded_by_torch.graph.initializer}
    np.testing.assert_allclose(weights["conv1.weight"], torch_weights["conv1.weight"], rtol=1e-5, atol=1e-7)
    x = calibration["input"][:32]
    np.testing.assert_allclose(
        _run(normalized.model, {"input": x})[0], _run(unfolded, {"input": x})[0], rtol=1e-4, atol=1e-5
    )

"""The exporter against real onnxruntime sessions: Q_b's integers, accuracy, mixed configurations, metadata."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from planner.candidates import Configuration
from planner.export import (
    PLAN_METADATA_KEY,
    ExportError,
    export_model,
    read_plan,
    stored_weight,
    validate_artifact,
)
from sensitivity.layers import Layer, find_layers, node_weight_index, weight_array
from sensitivity.onnx_program import load_onnx
from sensitivity.quantize import quantize_weight, to_float16
from tests.models import conv_batchnorm_model, recurrent_model, trained_digits_onnx, uninferable_model
from tests.planner.helpers import embedding_model

QUANTIZED = ("w8a8", "w4a8", "w8", "w4")
OPSETS = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]


@pytest.fixture(scope="module")
def digits():
    return trained_digits_onnx()


def _run(model_bytes: bytes, x: np.ndarray, input_name: str = "input") -> np.ndarray:
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    return session.run(None, {input_name: x})[0]


def _accuracy(model_bytes: bytes, data) -> float:
    return 100.0 * float(np.mean(_run(model_bytes, data.test_x).argmax(1) == data.test_y))


def _stored(model: onnx.ModelProto, node_name: str, layer: Layer):
    """Integers, scales, zero points and axis behind a node's input for the layer, read straight from the graph."""
    node = next(n for n in model.graph.node if n.name == node_name)
    dequantize = next(n for n in model.graph.node if node.input[node_weight_index(node.op_type, layer)] in n.output)
    assert dequantize.op_type == "DequantizeLinear"
    initializers = {i.name: i for i in model.graph.initializer}
    integers, scales, zero_points = (initializers[name] for name in dequantize.input)
    axis = next(a.i for a in dequantize.attribute if a.name == "axis")
    unpack = lambda t: numpy_helper.to_array(t).astype(np.int8)  # noqa: E731 - int4 arrays come back as ml_dtypes.int4
    return integers.data_type, unpack(integers), numpy_helper.to_array(scales), unpack(zero_points), axis


def zoo_model() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """ConvTranspose (channel axis 1), Gemm with transB=0 (axis 1), a contrib op, a MatMul weight used twice."""
    rng = np.random.default_rng(0)

    def weight(name, shape):
        return numpy_helper.from_array((0.3 * rng.normal(size=shape)).astype(np.float32), name)

    nodes = [
        helper.make_node("ConvTranspose", ["x", "deconv.weight"], ["d"], name="deconv"),
        helper.make_node("Flatten", ["d"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "gemm.weight", "gemm.bias"], ["g"], name="gemm"),
        helper.make_node("Gelu", ["g"], ["a"], domain="com.microsoft", name="gelu"),
        helper.make_node("MatMul", ["a", "shared.weight"], ["m1"], name="matmul1"),
        helper.make_node("Relu", ["m1"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "shared.weight"], ["m2"], name="matmul2"),
        helper.make_node("MatMul", ["m2", "head.weight"], ["y"], name="head"),
    ]
    initializers = [
        weight("deconv.weight", (4, 3, 2, 2)),
        weight("gemm.weight", (108, 16)),
        weight("gemm.bias", (16,)),
        weight("shared.weight", (16, 16)),
        weight("head.weight", (16, 6)),
    ]
    graph = helper.make_graph(
        nodes,
        "zoo",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=OPSETS)
    return model, {"x": rng.normal(size=(48, 4, 5, 5)).astype(np.float32)}


def _assert_weights_are_q_b(original: onnx.ModelProto, exported, configuration) -> None:
    model = exported.load()
    for layer in find_layers(original):
        candidate = configuration[layer.name]
        bits = {"w8a8": 8, "w8a16": 8, "w8": 8, "w4a8": 4, "w4": 4}.get(candidate)  # fp32, fp16: no integers
        if bits is None:
            assert stored_weight(model, layer.name) is None
            continue
        expected = quantize_weight(weight_array(original, layer.name), bits, layer.channel_axis)
        for node_name in exported.layers[layer.name].node_names:
            data_type, integers, scales, zero_points, axis = _stored(model, node_name, layer)
            assert data_type == (TensorProto.INT4 if bits == 4 else TensorProto.INT8), (layer.name, candidate)
            np.testing.assert_array_equal(integers, expected.integers, err_msg=f"{layer.name} {candidate}")
            np.testing.assert_array_equal(scales, expected.scales, err_msg=f"{layer.name} {candidate}")
            assert not zero_points.any() and axis % integers.ndim == layer.channel_axis
        readback = stored_weight(model, layer.name)
        assert (
            readback is not None
            and readback.bits == bits
            and np.array_equal(readback.dequantize(), expected.dequantize())
        )


@pytest.mark.slow
@pytest.mark.parametrize("candidate", QUANTIZED)
def test_digits_weights_are_q_b_integers(digits, candidate):
    proto, calibration, _ = digits
    configuration = Configuration.uniform(find_layers(proto), candidate)
    exported = export_model(proto, configuration, calibration)
    _assert_weights_are_q_b(proto, exported, configuration)
    assert exported.opset == (21 if "4" in candidate else 17)
    assert exported.load().ir_version >= (10 if "4" in candidate else 8)  # int4 needs IR 10


@pytest.mark.parametrize("candidate", QUANTIZED)
def test_zoo_weights_are_q_b_integers(candidate):
    """ConvTranspose/Gemm(transB=0) axes, a weight shared by two MatMuls, a contrib op in the graph."""
    model, calibration = zoo_model()
    configuration = Configuration.uniform(find_layers(model), candidate)
    exported = export_model(model, configuration, calibration)
    assert exported.layers["shared.weight"].node_names == ("matmul1", "matmul2")
    _assert_weights_are_q_b(model, exported, configuration)


@pytest.mark.parametrize("candidate", QUANTIZED)
def test_embedding_tables_store_q_b_integers_per_row(candidate):
    """A Gather's table is a layer; its input is indices, so every candidate quantizes the table alone."""
    model, calibration = embedding_model()
    assert [(layer.name, layer.op_type, layer.channel_axis) for layer in find_layers(model)] == [
        ("table", "Gather", 0),
        ("head", "MatMul", 1),
    ]
    configuration = Configuration.uniform(find_layers(model), candidate)
    exported = export_model(model, configuration, calibration)
    _assert_weights_are_q_b(model, exported, configuration)
    table = exported.layers["table"]
    assert table.method == "weight_only_dequantize" and table.activation_bits is None
    assert exported.layers["head"].activation_bits == (8 if "a8" in candidate else None)
    if "a8" not in candidate:  # weights only: the graph computes with Q_b's tables exactly
        bits = 8 if "8" in candidate else 4
        table_q, head_q = (
            quantize_weight(weight_array(model, name), bits, axis).dequantize()
            for name, axis in (("table", 0), ("head", 1))
        )
        ids = calibration["ids"]
        # Unoptimized: onnxruntime's CPU optimizer fuses DequantizeLinear -> MatMul into MatMulNBits,
        # which computes in int8 (accuracy_level 4) and so differs from the graph by ~1 %.
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(exported.model_bytes, options, providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(
            session.run(None, {"ids": ids})[0], table_q[ids].mean(axis=1) @ head_q, rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize("candidate", QUANTIZED)
def test_recurrent_weights_store_q_b_integers_weight_only(candidate):
    """LSTM W and R are layers (channel axis 1, a scale per gate row). onnxruntime's QDQ quantizer has
    no LSTM, so every quantized candidate stores them behind a DequantizeLinear and the LSTM input
    stays float; the graph then computes what the interpreter predicts with Q_b's weights."""
    model, calibration = recurrent_model()
    layers = find_layers(model)
    assert [(layer.name, layer.op_type, layer.channel_axis, layer.weight_index) for layer in layers] == [
        ("lstm.W", "LSTM", 1, 1),
        ("lstm.R", "LSTM", 1, 2),
        ("fc.weight", "Gemm", 1, 1),
    ]
    configuration = Configuration.uniform(layers, candidate)
    exported = export_model(model, configuration, calibration)
    _assert_weights_are_q_b(model, exported, configuration)
    for name in ("lstm.W", "lstm.R"):
        layer = exported.layers[name]
        assert (layer.method, layer.activation_bits, layer.node_names) == ("weight_only_dequantize", None, ("lstm",))
    assert read_plan(exported.model_bytes)["layers"]["lstm.R"]["weight_input"] == 2
    assert exported.layers["fc.weight"].activation_bits == (8 if "a8" in candidate else None)
    if "a8" not in candidate:
        bits = 8 if "8" in candidate else 4
        program = load_onnx(model)
        predicted = {
            layer.name: torch.from_numpy(
                quantize_weight(weight_array(model, layer.name), bits, layer.channel_axis).dequantize()
            )
            for layer in layers
        }
        expected = program.forward(predicted, {"x": torch.from_numpy(calibration["x"])})[0].numpy()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(exported.model_bytes, options, providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(session.run(None, calibration)[0], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_w8a8_digits_accuracy_within_one_point_of_float(digits):
    proto, calibration, data = digits
    exported = export_model(proto, Configuration.uniform(find_layers(proto), "w8a8"), calibration)
    float_accuracy = _accuracy(proto.SerializeToString(), data)
    quantized_accuracy = _accuracy(exported.model_bytes, data)
    assert float_accuracy > 90.0
    assert abs(float_accuracy - quantized_accuracy) <= 1.0, (float_accuracy, quantized_accuracy)
    # Activations really are quantized: every layer's input comes out of a DequantizeLinear.
    model = exported.load()
    producers = {out: node.op_type for node in model.graph.node for out in node.output}
    for layer in exported.layers.values():
        node = next(n for n in model.graph.node if n.name == layer.node_names[0])
        assert producers[node.input[0]] == "DequantizeLinear"


MIXED = [
    {"conv1.weight": "fp32", "conv2.weight": "w8a8", "fc1.weight": "w4", "fc2.weight": "w4a8"},
    {"conv1.weight": "w4a8", "conv2.weight": "w4", "fc1.weight": "w8", "fc2.weight": "fp32"},
    {"conv1.weight": "w8", "conv2.weight": "fp32", "fc1.weight": "w8a8", "fc2.weight": "w4"},
]


@pytest.mark.slow
@pytest.mark.parametrize("configuration", MIXED)
def test_mixed_configurations_export_and_run(digits, configuration):
    proto, calibration, data = digits
    exported = export_model(proto, configuration, calibration)
    onnx.checker.check_model(exported.load())
    _assert_weights_are_q_b(proto, exported, configuration)
    assert _accuracy(exported.model_bytes, data) > _accuracy(proto.SerializeToString(), data) - 5.0
    methods = {name: layer.method for name, layer in exported.layers.items()}
    for name, candidate in configuration.items():
        expected = {"fp32": "float", "w8": "weight_only_dequantize", "w4": "weight_only_dequantize"}
        assert methods[name] == expected.get(candidate, "onnxruntime.quantize_static")
    # fp32 layers keep their original weights, bit for bit.
    initializers = {i.name: i for i in exported.load().graph.initializer}
    for name in (n for n, c in configuration.items() if c == "fp32"):
        np.testing.assert_array_equal(numpy_helper.to_array(initializers[name]), weight_array(proto, name))


def test_uninferable_model_exports_with_quantized_activations(tmp_path, monkeypatch):
    model, calibration = uninferable_model()
    premise = tmp_path / "premise"
    premise.mkdir()
    monkeypatch.chdir(premise)  # symbolic shape inference leaves sym_shape_infer_temp.onnx in the cwd on failure
    with pytest.raises(Exception, match="Incomplete symbolic shape inference"):
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        SymbolicShapeInference.infer_shapes(model)
    assert not onnx.shape_inference.infer_shapes(model).graph.value_info
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    layers = find_layers(model)
    assert [layer.node_name for layer in layers] == ["MatMul_2", "Gemm_4"]
    for configuration in ({"fc1.weight": "w8a8", "fc2.weight": "w4a8"}, {"fc1.weight": "w4", "fc2.weight": "w8a8"}):
        exported = export_model(model, configuration, calibration)
        assert "without symbolic" in exported.plan["preprocessing"]
        _assert_weights_are_q_b(model, exported, configuration)
        quantized = exported.load()
        producers = {out: node.op_type for node in quantized.graph.node for out in node.output}
        gemm = next(n for n in quantized.graph.node if n.op_type == "Gemm")
        assert producers[gemm.input[0]] == "DequantizeLinear"  # the activation got a type and was quantized
        reference = _run(model.SerializeToString(), calibration["x"], "x")
        output = _run(exported.model_bytes, calibration["x"], "x")
        assert np.corrcoef(reference.ravel(), output.ravel())[0, 1] > 0.99
    assert not list(work.iterdir()), "the exporter left files in the working directory"


@pytest.mark.slow
def test_metadata_round_trips(digits):
    proto, calibration, _ = digits
    configuration = MIXED[0]
    constraints = {"max_size_bytes": 20000, "max_drop": 1.0}
    exported = export_model(proto, configuration, calibration, metadata={"job": "42"}, constraints=constraints)
    model = onnx.load_from_string(exported.model_bytes)
    plan = read_plan(model)
    assert plan == dict(exported.plan)
    assert plan["configuration"] == configuration
    assert plan["constraints"] == constraints
    assert plan["layers"]["fc1.weight"]["weight_bits"] == 4 and plan["layers"]["fc1.weight"]["activation_bits"] is None
    assert plan["opset"] == {"source": 17, "exported": 21}
    assert plan["versions"]["onnx"] == onnx.__version__ and plan["versions"]["onnxruntime"] == ort.__version__
    assert plan["versions"]["mpq"]
    assert plan["calibration"]["samples"] == 256
    props = {p.key: p.value for p in model.metadata_props}
    assert props["job"] == "42" and PLAN_METADATA_KEY in props
    assert Configuration.from_dict(plan["configuration"]) == Configuration(configuration)


@pytest.mark.slow
def test_export_is_deterministic(digits):
    proto, calibration, _ = digits
    first = export_model(proto, MIXED[1], calibration)
    second = export_model(proto, MIXED[1], calibration)
    assert first.sha256 == second.sha256 and first.model_bytes == second.model_bytes


def test_onnxruntime_int4_would_differ_from_q_b():
    """Why int4 scales are given to quantize_static: its own symmetric int4 ([-8, 7], 2·absmax/15) differs."""
    from onnxruntime.quantization.quant_utils import quantize_data

    weight = np.linspace(-1.0, 1.0, 31, dtype=np.float32)
    _, scale, integers = quantize_data(weight, TensorProto.INT4, symmetric=True)
    q_b = quantize_weight(weight[None, :], 4, 0)
    assert not np.array_equal(np.asarray(integers).astype(np.int8), q_b.integers[0])
    assert float(scale) != float(q_b.scales[0])


@pytest.mark.slow
def test_bad_calibration_is_named(digits):
    proto, calibration, _ = digits
    configuration = Configuration.uniform(find_layers(proto), "w8a8")
    with pytest.raises(ValueError, match=r"missing \['input'\], unknown \['images'\]"):
        export_model(proto, configuration, {"images": calibration["input"]})
    with pytest.raises(ValueError, match="'input' has dtype float64"):
        export_model(proto, configuration, {"input": calibration["input"].astype(np.float64)})
    with pytest.raises(ValueError, match=r"'input' has shape \(256, 64\)"):
        export_model(proto, configuration, {"input": calibration["input"].reshape(256, 64)})
    with pytest.raises(ValueError, match="no samples"):
        export_model(proto, configuration, {"input": calibration["input"][:0]})
    with pytest.raises(ValueError, match=r"missing layer\(s\) 'fc2.weight'"):
        export_model(proto, {k: "w8a8" for k in ("conv1.weight", "conv2.weight", "fc1.weight")}, calibration)
    with pytest.raises(ValueError, match="reserved"):
        export_model(proto, configuration, calibration, metadata={PLAN_METADATA_KEY: "x"})
    with pytest.raises(ValueError, match="calibration method"):
        export_model(proto, configuration, calibration, calibrate_method="magic")
    dynamic = onnx.ModelProto()
    dynamic.CopyFrom(proto)
    for dim in dynamic.graph.input[0].type.tensor_type.shape.dim[2:]:
        dim.dim_param = "side"  # accepts 4x4 images, which then fail in the first Gemm
    with pytest.raises(ValueError, match="does not run in onnxruntime on the calibration inputs"):
        export_model(dynamic, configuration, {"input": calibration["input"][:, :, :4, :4].copy()})


@pytest.mark.slow
def test_validate_artifact_rejects_broken_models(digits):
    proto, calibration, _ = digits
    broken = onnx.ModelProto()
    broken.CopyFrom(proto)
    broken.graph.node[0].input[1] = "no_such_tensor"
    with pytest.raises(ExportError, match=r"onnx\.checker"):
        validate_artifact(broken.SerializeToString(), calibration)
    with pytest.raises(ExportError, match="does not run in onnxruntime"):
        validate_artifact(proto.SerializeToString(), {"input": calibration["input"][:, :, :4, :4].copy()})


EDGE_VALUES = [0.0, 1e-40, float(np.finfo(np.float32).tiny), 1.4928777e-36, 0.5, -0.5, 2.5 / 127, 3.0e38]


@pytest.mark.slow
@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.lists(st.floats(-1e3, 1e3, width=32) | st.sampled_from(EDGE_VALUES), min_size=1, max_size=9),
        min_size=1,
        max_size=6,
    ).filter(lambda rows: len({len(r) for r in rows}) == 1)
)
def test_q_b_int8_equals_onnxruntime_per_channel_quantizer(rows):
    """The contract: Q_b at 8 bits gives onnxruntime's symmetric per-channel integers and scales exactly."""
    from onnxruntime.quantization.quant_utils import quantize_data

    weight = np.asarray(rows, dtype=np.float32)
    ours = quantize_weight(weight, 8, 0)
    for channel in range(weight.shape[0]):
        zero_point, scale, integers = quantize_data(weight[channel], TensorProto.INT8, symmetric=True)
        assert int(zero_point) == 0
        assert np.float32(scale) == ours.scales[channel], (weight[channel], scale, ours.scales[channel])
        np.testing.assert_array_equal(np.asarray(integers, dtype=np.int8), ours.integers[channel])


def test_onnxruntime_matmul_nbits_would_differ_from_q_b():
    """Why weight-only MatMuls do not use MatMulNBitsQuantizer: even one block per column (per channel),
    its symmetric int4 uses [-8, 7] with a signed scale max/-8, so its integers are not Q_b's."""
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    weight = np.random.default_rng(0).normal(size=(32, 8)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    config = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, quant_format=QuantFormat.QDQ)
    quantizer = MatMulNBitsQuantizer(model, algo_config=config)
    quantizer.process()
    initializers = list(quantizer.model.model.graph.initializer)
    integers = next(numpy_helper.to_array(i) for i in initializers if i.data_type == TensorProto.INT4).astype(np.int8)
    q_b = quantize_weight(weight, 4, 1)
    assert integers.shape == q_b.integers.shape and integers.min() == -8
    assert not np.array_equal(integers, q_b.integers)


@pytest.mark.slow
def test_an_upgrade_that_changes_outputs_is_refused(digits, monkeypatch):
    """Fault injection: a version converter that perturbs one weight by 1e-3 must be caught."""
    proto, calibration, _ = digits
    convert = onnx.version_converter.convert_version

    def perturbing_convert(model, target):
        upgraded = convert(model, target)
        weight = next(i for i in upgraded.graph.initializer if i.name == "fc2.weight")
        weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) + np.float32(1e-3), "fc2.weight"))
        return upgraded

    monkeypatch.setattr(onnx.version_converter, "convert_version", perturbing_convert)
    with pytest.raises(ExportError, match="computes different outputs"):
        export_model(proto, Configuration.uniform(find_layers(proto), "w4"), calibration)
    assert export_model(proto, Configuration.uniform(find_layers(proto), "w8"), calibration).opset == 17


@pytest.mark.parametrize("candidate", ["w8", "w8a8"])
def test_an_unfolded_batchnorm_is_folded_before_quantizing(candidate):
    """The artifact quantizes the folded weight (DequantizeLinear -> Conv, no BN after it, as a torch
    export has it) and computes the float model's outputs within int8 error."""
    model = conv_batchnorm_model()
    x = np.random.default_rng(4).standard_normal((16, 4, 6, 6)).astype(np.float32)
    exported = export_model(model, {"layer.weight": candidate}, {"x": x})
    graph = exported.load().graph
    assert "BatchNormalization" not in {node.op_type for node in graph.node}
    assert list(exported.layers) == ["layer.weight"]
    assert exported.plan["normalization"]["folded_batchnorms"] == ["layer.weight"]
    expected = _run(model.SerializeToString(), x, "x")
    assert np.max(np.abs(_run(exported.model_bytes, x, "x") - expected)) < 0.05 * np.max(np.abs(expected))


def _float16_weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.data_type == TensorProto.FLOAT16}


@pytest.mark.slow
def test_uniform_fp16_runs_close_to_float_with_q16_weights(digits):
    proto, calibration, data = digits
    layers = find_layers(proto)
    exported = export_model(proto, Configuration.uniform(layers, "fp16"), calibration)
    model = exported.load()
    onnx.checker.check_model(model)
    stored = _float16_weights(model)
    for layer in layers:  # the weight is Q_16(W), the float32 one is gone
        np.testing.assert_array_equal(stored[layer.name + "_fp16"], to_float16(weight_array(proto, layer.name)))
        assert layer.name not in {i.name for i in model.graph.initializer}
        assert (exported.layers[layer.name].method, exported.layers[layer.name].weight_bits) == ("float16", 16)
    assert stored_weight(model, layers[0].name) is None  # no integers behind it
    float_out = _run(proto.SerializeToString(), data.test_x)
    half_out = _run(exported.model_bytes, data.test_x)
    # float16 keeps 11 significant bits: measured 5e-4 of the largest logit on these samples
    assert np.abs(half_out - float_out).max() <= 2e-3 * np.abs(float_out).max()
    assert np.mean(half_out.argmax(1) == float_out.argmax(1)) >= 0.995
    assert half_out.dtype == np.float32  # inputs and outputs stay float32 (Casts inside)
    assert len(exported.model_bytes) < 0.6 * len(proto.SerializeToString())


@pytest.mark.slow
def test_fp16_mixes_with_integer_candidates(digits):
    proto, calibration, data = digits
    configuration = {"conv1.weight": "w8a8", "conv2.weight": "fp16", "fc1.weight": "w8", "fc2.weight": "fp16"}
    exported = export_model(proto, configuration, calibration)
    model = exported.load()
    onnx.checker.check_model(model)
    _assert_weights_are_q_b(proto, exported, configuration)
    types = {n.name: n for n in model.graph.node}
    conv2 = types["/conv2/Conv"]
    producers = {out: node for node in model.graph.node for out in node.output}
    assert producers[conv2.input[0]].op_type == "Cast"  # its float32 input cast to float16
    assert [n.op_type for n in model.graph.node].count("Cast") == 4  # in and out of the two fp16 layers
    assert _accuracy(exported.model_bytes, data) > _accuracy(proto.SerializeToString(), data) - 1.0


@pytest.mark.slow
def test_fp16_on_shared_and_table_layers():
    """A Gather table at fp16 (integer indices stay integer) and an LSTM whose W is fp16 while R is w8: the
    LSTM node keeps computing in float32, reading W's float16 values through a Cast."""
    model, calibration = recurrent_model()
    configuration = {"lstm.W": "fp16", "lstm.R": "w8", "fc.weight": "fp16"}
    exported = export_model(model, configuration, calibration)
    proto = exported.load()
    lstm = next(n for n in proto.graph.node if n.op_type == "LSTM")
    producers = {out: node for node in proto.graph.node for out in node.output}
    cast = producers[lstm.input[1]]
    assert (cast.op_type, cast.input[0]) == ("Cast", "lstm.W_fp16")
    assert producers[lstm.input[2]].op_type == "DequantizeLinear"
    # what the interpreter computes with Q_16's W and Q_8's R
    program = load_onnx(model)
    predicted = {
        "lstm.W": torch.from_numpy(to_float16(weight_array(model, "lstm.W")).astype(np.float32)),
        "lstm.R": torch.from_numpy(quantize_weight(weight_array(model, "lstm.R"), 8, 1).dequantize()),
        "fc.weight": torch.from_numpy(to_float16(weight_array(model, "fc.weight")).astype(np.float32)),
    }
    expected = program.forward(predicted, {"x": torch.from_numpy(calibration["x"])})[0].numpy()
    got = ort.InferenceSession(exported.model_bytes, providers=["CPUExecutionProvider"]).run(None, calibration)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-2, atol=1e-2 * np.abs(expected).max())  # fc computes in float16

    table_model, ids = embedding_model()
    table = export_model(table_model, Configuration.uniform(find_layers(table_model), "fp16"), ids)
    stored = _float16_weights(table.load())
    np.testing.assert_array_equal(stored["table_fp16"], to_float16(weight_array(table_model, "table")))
    session = ort.InferenceSession(table.model_bytes, providers=["CPUExecutionProvider"])
    reference = ort.InferenceSession(table_model.SerializeToString(), providers=["CPUExecutionProvider"])
    out, ref = session.run(None, ids)[0], reference.run(None, ids)[0]
    assert np.abs(out - ref).max() <= 2e-3 * np.abs(ref).max()


@pytest.mark.slow
def test_w8a16_quantizes_activations_to_uint16_at_opset_21(digits):
    proto, calibration, data = digits
    layers = find_layers(proto)
    exported = export_model(proto, Configuration.uniform(layers, "w8a16"), calibration)
    model = exported.load()
    assert exported.opset == 21  # 16-bit QuantizeLinear types
    _assert_weights_are_q_b(proto, exported, Configuration.uniform(layers, "w8a16"))
    zero_point_types = {
        i.data_type
        for i in model.graph.initializer
        # activations' zero points: not a weight's (layer name) nor an int32 bias's (_quantized_)
        if i.name.endswith("zero_point") and "weight" not in i.name and not i.name.endswith("_quantized_zero_point")
    }
    assert zero_point_types == {TensorProto.UINT16}
    assert all(layer.activation_bits == 16 for layer in exported.layers.values())
    float_out = _run(proto.SerializeToString(), data.test_x)
    w8a8_out = _run(export_model(proto, Configuration.uniform(layers, "w8a8"), calibration).model_bytes, data.test_x)
    w8a16_out = _run(exported.model_bytes, data.test_x)
    # 16-bit activations leave the int8 weights' error alone: closer to float than w8a8
    assert np.abs(w8a16_out - float_out).mean() < np.abs(w8a8_out - float_out).mean()
    mixed = export_model(proto, {**Configuration.uniform(layers, "w8a8"), "fc1.weight": "w8a16"}, calibration)
    types = {i.data_type for i in mixed.load().graph.initializer if i.name.endswith("zero_point")}
    assert {TensorProto.UINT8, TensorProto.UINT16} <= types
    assert _accuracy(mixed.model_bytes, data) > _accuracy(proto.SerializeToString(), data) - 1.0

"""Small models and data made on the spot (nothing is downloaded), shared by the test areas and bench/.

Plain builders, not fixtures: the fixtures live in the conftest.py files. Importing this module does not
import torch (``trained_digits_onnx`` imports it when called).
"""

from __future__ import annotations

import functools
import io
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# ---------------------------------------------------------------- small ONNX models and their data


def tiny_onnx_model(seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    """x[N,8] -> Gemm(8->6) -> Relu -> MatMul(6->3): two quantizable layers."""
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.standard_normal((6, 8)).astype(np.float32), "fc1.weight")
    b1 = numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "fc1.bias")
    w2 = numpy_helper.from_array(rng.standard_normal((6, 3)).astype(np.float32), "fc2.weight")
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "fc1.weight", "fc1.bias"], ["h"], name="fc1", transB=1),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "fc2.weight"], ["y"], name="fc2"),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [w1, b1, w2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def stateful_onnx_model(seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    """A silero-vad-like model with three kinds of input: x [batch, 6] (samples on axis 0), a recurrent
    state [2, batch, 4] (samples on axis 1) and sr, a rank-0 int64 sample rate shared by every sample.
    y = tanh((x · sr/16000) @ fc1 + state as [batch, 8]) @ fc2 [batch, 3]; stateN [2, batch, 4] is the
    tanh as the next state. Two quantizable layers: fc1.weight [6, 8] and fc2.weight [8, 3]."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(0.5 * rng.standard_normal(shape).astype(np.float32), name)
        for name, shape in (("fc1.weight", (6, 8)), ("fc2.weight", (8, 3)))
    ]
    inits += [
        numpy_helper.from_array(np.array(16000.0, np.float32), "rate"),
        numpy_helper.from_array(np.array([-1, 8], np.int64), "flat"),
        numpy_helper.from_array(np.array([-1, 2, 4], np.int64), "halves"),
    ]
    nodes = [
        helper.make_node("Cast", ["sr"], ["sr_float"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["sr_float", "rate"], ["scale"]),
        helper.make_node("Mul", ["x", "scale"], ["scaled"]),
        helper.make_node("MatMul", ["scaled", "fc1.weight"], ["h"], name="fc1"),
        helper.make_node("Transpose", ["state"], ["batch_first"], perm=[1, 0, 2]),
        helper.make_node("Reshape", ["batch_first", "flat"], ["state_rows"]),
        helper.make_node("Add", ["h", "state_rows"], ["mixed"]),
        helper.make_node("Tanh", ["mixed"], ["a"]),
        helper.make_node("MatMul", ["a", "fc2.weight"], ["y"], name="fc2"),
        helper.make_node("Reshape", ["a", "halves"], ["a_halves"]),
        helper.make_node("Transpose", ["a_halves"], ["stateN"], perm=[1, 0, 2]),
    ]
    graph = helper.make_graph(
        nodes,
        "stateful",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6]),
            helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "batch", 4]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, "batch", 4]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def stateful_data(count: int, seed: int = 1, rate: int = 16000) -> dict[str, np.ndarray]:
    """Inputs of ``stateful_onnx_model`` for ``count`` samples: state [2, count, 4], sr one scalar."""
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((count, 6)).astype(np.float32),
        "state": 0.3 * rng.standard_normal((2, count, 4)).astype(np.float32),
        "sr": np.array(rate, np.int64),
    }


def mlp_onnx_model(inputs: int = 256, width: int = 1024, classes: int = 10, seed: int = 0) -> onnx.ModelProto:
    """A wide Gemm-Relu MLP: heavy enough that a Hessian analysis takes a while."""
    rng = np.random.default_rng(seed)
    sizes = [(width, inputs), (width, width), (classes, width)]
    nodes, inits, current = [], [], "x"
    for index, (rows, cols) in enumerate(sizes):
        weight = f"fc{index}.weight"
        inits.append(
            numpy_helper.from_array((rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32), weight)
        )
        nodes.append(helper.make_node("Gemm", [current, weight], [f"h{index}"], transB=1))
        current = f"h{index}"
        if index < len(sizes) - 1:
            nodes.append(helper.make_node("Relu", [current], [f"r{index}"]))
            current = f"r{index}"
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", inputs])],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, ["batch", classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def matmul_chain_model(depth: int, width: int = 256, seed: int = 0) -> onnx.ModelProto:
    """``depth`` MatMul-Relu steps on x [batch, width]: the same graph does ``depth`` times the work
    of one step (latency comparisons need models whose order of speed is known)."""
    rng = np.random.default_rng(seed)
    nodes, inits, current = [], [], "x"
    for index in range(depth):
        weight = f"w{index}"
        inits.append(
            numpy_helper.from_array((rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32), weight)
        )
        nodes.append(helper.make_node("MatMul", [current, weight], [f"m{index}"]))
        nodes.append(helper.make_node("Relu", [f"m{index}"], [f"r{index}"]))
        current = f"r{index}"
    graph = helper.make_graph(
        nodes,
        "matmul_chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, ["batch", width])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]  # numpy's stub reads a ** dict as allow_pickle
    return buffer.getvalue()


# ---------------------------------------------------------------- per-input sample axes (sensitivity.samples)


def loosely_declared_stateful_model() -> onnx.ModelProto:
    """The stateful model as a careless exporter declares it: every dim of the state symbolic, the
    sample rate a vector [1]. Nothing in the shapes says where the state's samples lie."""
    model = stateful_onnx_model()
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if value.name == "state":
            for index, dim in enumerate(dims):
                dim.dim_param = f"state_{index}"
        if value.name == "sr":
            dims.add().dim_value = 1
    return model


def loose_data(count: int) -> dict[str, np.ndarray]:
    return {**stateful_data(count), "sr": np.array([16000], np.int64)}


# ---------------------------------------------------------------- exporter quirks (sensitivity.normalize)


def constant_node(name: str, array: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array, name), name=f"{name}_node")


def paddle_style_model(bias_channels: int = 8) -> onnx.ModelProto:
    """x[-1, 3, 8, 8] -> Conv (weight and bias from Constant nodes) -> Reshape to [-1, C*64] (shape
    from a 2-element Constant): how paddle2onnx writes every model."""
    rng = np.random.default_rng(0)
    channels = bias_channels
    nodes = [
        constant_node("conv.w", rng.standard_normal((channels, 3, 3, 3)).astype(np.float32)),
        constant_node("conv.b", rng.standard_normal(channels).astype(np.float32)),
        constant_node("shape", np.array([-1, channels * 64], dtype=np.int64)),
        helper.make_node("Conv", ["x", "conv.w", "conv.b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Reshape", ["c", "shape"], ["y"], name="flatten"),
    ]
    graph = helper.make_graph(
        nodes,
        "paddle",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, channels * 64])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)])
    model.ir_version = 8
    return model


def scaled_weight(model: onnx.ModelProto, name: str, factor: float, offset: float = 0.0) -> onnx.ModelProto:
    """A copy of ``model`` whose initializer ``name`` is multiplied by ``factor``, plus ``offset``."""
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    weight = next(init for init in changed.graph.initializer if init.name == name)
    array = numpy_helper.to_array(weight) * np.float32(factor) + np.float32(offset)
    weight.CopyFrom(numpy_helper.from_array(array.astype(np.float32), name))
    return changed


def _bn_vectors(rng: np.random.Generator, prefix: str, channels: int) -> list[onnx.TensorProto]:
    """gamma, beta, mean, var far from the identity, so an unfolded or wrongly folded BN shows."""
    arrays = {
        "weight": rng.uniform(0.5, 2.0, channels),
        "bias": rng.uniform(-1.0, 1.0, channels),
        "running_mean": rng.uniform(-1.0, 1.0, channels),
        "running_var": rng.uniform(0.5, 2.0, channels),
    }
    return [numpy_helper.from_array(array.astype(np.float32), f"{prefix}.{key}") for key, array in arrays.items()]


def _bn_node(prefix: str, source: str, output: str) -> onnx.NodeProto:
    names = [f"{prefix}.{key}" for key in ("weight", "bias", "running_mean", "running_var")]
    return helper.make_node("BatchNormalization", [source, *names], [output], name=prefix, epsilon=1e-3)


def conv_batchnorm_model(
    op: str = "Conv", bias: bool = True, group: int = 1, extra_reader: bool = False, shared_weight: bool = False
) -> onnx.ModelProto:
    """x[N, 4, 6, 6] -> ``op`` (4 -> 8 channels, ``group`` groups) -> BatchNormalization -> Relu -> y, as
    paddle2onnx writes it (the BN not folded). ``extra_reader``: the layer's output is also a second
    output through a Sigmoid; ``shared_weight``: a second ``op`` on x with the same weight is added to
    the Relu. ``op`` "Gemm" reads x flattened to [N, 144] (transB 1: a [8, 144] weight)."""
    rng = np.random.default_rng(3)
    channels = 8  # >= PROMOTE_MIN_ELEMENTS: BN vectors written as Constant nodes become initializers
    if op == "Gemm":
        shape: tuple[int, ...] = (channels, 4 * 36)
        attributes: dict[str, Any] = {"transB": 1}
    elif op == "ConvTranspose":
        shape, attributes = (4, channels // group, 3, 3), {"group": group, "pads": [1, 1, 1, 1]}
    else:
        shape, attributes = (channels, 4 // group, 3, 3), {"group": group, "pads": [1, 1, 1, 1]}
    initializers = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), "layer.weight")]
    inputs = ["h", "layer.weight"]
    if bias:
        initializers.append(numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32), "layer.bias"))
        inputs.append("layer.bias")
    nodes = [helper.make_node("Flatten", ["x"], ["h"]) if op == "Gemm" else helper.make_node("Identity", ["x"], ["h"])]
    nodes += [helper.make_node(op, inputs, ["c"], name="layer", **attributes), _bn_node("bn", "c", "n")]
    initializers += _bn_vectors(rng, "bn", channels)
    out_shape: list[str | int] = ["batch", channels] if op == "Gemm" else ["batch", channels, 6, 6]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)]
    if shared_weight:
        nodes += [helper.make_node(op, ["h", "layer.weight"], ["c2"], name="twin", **attributes)]
        nodes += [helper.make_node("Add", ["n", "c2"], ["s"]), helper.make_node("Relu", ["s"], ["y"])]
    else:
        nodes.append(helper.make_node("Relu", ["n"], ["y"]))
    if extra_reader:
        nodes.append(helper.make_node("Sigmoid", ["c"], ["side"]))
        outputs.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, out_shape))
    graph = helper.make_graph(
        nodes,
        "conv_bn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 6, 6])],
        outputs,
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


# ---------------------------------------------------------------- an LSTM layer; a graph shape inference cannot type


def recurrent_model() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A model with an LSTM layer: x [N, 5, 3] -> bidirectional LSTM (W, R: two layers; B stays float) ->
    final states -> Gemm [8, 3]."""
    rng = np.random.default_rng(0)

    def weight(name, shape):
        return numpy_helper.from_array((0.5 * rng.standard_normal(shape)).astype(np.float32), name)

    graph = helper.make_graph(
        [
            helper.make_node("Transpose", ["x"], ["steps"], name="time_major", perm=[1, 0, 2]),
            helper.make_node(
                "LSTM",
                ["steps", "lstm.W", "lstm.R", "lstm.B"],
                ["", "h_n"],
                name="lstm",
                hidden_size=4,
                direction="bidirectional",
            ),
            helper.make_node("Transpose", ["h_n"], ["h_batch"], name="batch_major", perm=[1, 0, 2]),
            helper.make_node("Flatten", ["h_batch"], ["features"], name="flatten", axis=1),
            helper.make_node("Gemm", ["features", "fc.weight"], ["logits"], name="fc"),
        ],
        "recurrent",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5, 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        [
            weight("lstm.W", (2, 16, 3)),
            weight("lstm.R", (2, 16, 4)),
            weight("lstm.B", (2, 32)),
            weight("fc.weight", (8, 3)),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model, {"x": rng.standard_normal((64, 5, 3)).astype(np.float32)}


def uninferable_model() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """com.microsoft Inverse: onnxruntime runs it, but ONNX shape inference gives no type for anything after it
    and onnxruntime's symbolic shape inference raises."""
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("Inverse", ["x"], ["inv"], domain="com.microsoft"),  # unnamed on purpose
        helper.make_node("Flatten", ["inv"], ["flat"]),
        helper.make_node("MatMul", ["flat", "fc1.weight"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Gemm", ["r", "fc2.weight"], ["y"], transB=1),
    ]
    initializers = [
        numpy_helper.from_array(rng.normal(size=(16, 8)).astype(np.float32), "fc1.weight"),
        numpy_helper.from_array(rng.normal(size=(3, 8)).astype(np.float32), "fc2.weight"),
    ]
    graph = helper.make_graph(
        nodes,
        "uninferable",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    x = (np.eye(4) + 0.2 * rng.normal(size=(40, 4, 4))).astype(np.float32)
    return model, {"x": x}


# ---------------------------------------------------------------- a trained model (planner and service)


@functools.cache
def trained_digits_module():
    """The trained digits CNN (conv-BatchNorm-ReLU twice, two Linears) and its data (~5 s to train).

    Cached so the test modules that need it share one training run in a session. One torch thread:
    on the shared 2-core machine a second thread mostly waits (12 s vs 16 s measured under load).
    """
    import torch

    from sensitivity.examples import trained_digits_cnn

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return trained_digits_cnn()
    finally:
        torch.set_num_threads(threads)


@functools.cache
def digits_onnx_with_batchnorm() -> onnx.ModelProto:
    """The trained digits CNN as ONNX with each BatchNorm left after its conv, as paddle2onnx writes
    BNs: the TorchScript exporter folds them only when it is told the model is in eval mode
    (``TrainingMode.PRESERVE`` on a module in eval mode exports inference BNs unfolded)."""
    import torch

    from sensitivity.examples import torchscript_export

    model, data = trained_digits_module()
    exported = torchscript_export(
        model.eval(),
        (torch.from_numpy(data.train_x[:1]),),
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17,
        training=torch.onnx.TrainingMode.PRESERVE,
        do_constant_folding=False,
    )
    return onnx.load_from_string(exported)


@functools.cache
def trained_digits_onnx():
    """The trained digits CNN as ONNX (opset 17, TorchScript exporter: BatchNorm folded) with calibration
    and test data."""
    import torch

    from sensitivity.examples import export_onnx

    model, data = trained_digits_module()
    proto = export_onnx(model, torch.from_numpy(data.train_x[:1]))
    return proto, {"input": data.train_x[:256]}, data


# ---------------------------------------------------------------- latency: where int8 is slower or faster


def latency_mixed_model(tokens: int = 32, width: int = 512, narrow: int = 4, seed: int = 0) -> onnx.ModelProto:
    """x [batch, tokens, width] -> MatMul big [width, width] -> Relu -> Reshape [batch, -1, narrow] ->
    (MatMul small_k [narrow, narrow] -> Tanh) x 2. At w8a8 the big MatMul runs faster than float
    (0.46x of the model's time alone, 2-core machine, 1 thread) while each small one, a K=4 product over
    4096 rows, runs slower: its activation's QuantizeLinear costs more than the product (ratio 1.15)."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(
            (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32), "big.weight"
        ),
        numpy_helper.from_array(np.array([0, -1, narrow], np.int64), "narrow_shape"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "big.weight"], ["hb"], name="big"),
        helper.make_node("Relu", ["hb"], ["rb"], name="relu"),
        helper.make_node("Reshape", ["rb", "narrow_shape"], ["t_in"], name="narrow"),
    ]
    current = "t_in"
    for k in range(2):
        weight = (rng.standard_normal((narrow, narrow)) / 2).astype(np.float32)
        inits.append(numpy_helper.from_array(weight, f"small{k}.weight"))
        nodes.append(helper.make_node("MatMul", [current, f"small{k}.weight"], [f"m{k}"], name=f"small{k}"))
        nodes.append(helper.make_node("Tanh", [f"m{k}"], [f"t{k}"], name=f"tanh{k}"))
        current = f"t{k}"
    graph = helper.make_graph(
        nodes,
        "latency_mixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", tokens, width])],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, ["batch", tokens * width // narrow, narrow])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def latency_mixed_data(count: int = 16, tokens: int = 32, width: int = 512, seed: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((count, tokens, width)).astype(np.float32)}

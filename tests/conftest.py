"""Shared fixtures: small models and data made on the spot (nothing is downloaded)."""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper


@pytest.fixture(autouse=True)
def _private_sensitivity_cache(tmp_path_factory, monkeypatch) -> None:
    """Each test gets its own (empty) local sensitivity cache, for the CLI it runs in-process and
    in subprocesses: a result cached by one test must not stand in for another test's computation,
    and nothing is written to the home folder."""
    monkeypatch.setenv("MPQ_CACHE_DIR", str(tmp_path_factory.mktemp("mpq-cache")))


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


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def tiny_model_bytes() -> bytes:
    return tiny_onnx_model().SerializeToString()


@pytest.fixture(scope="session")
def tiny_dataset_bytes() -> bytes:
    rng = np.random.default_rng(0)
    return npz_bytes(x=rng.standard_normal((16, 8)).astype(np.float32), labels=rng.integers(0, 3, 16))

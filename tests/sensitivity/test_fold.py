"""Weights computed from constants by data-movement ops are folded into initializers
(sensitivity.fold through normalize_model): which are, what they hold, what is dropped."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import onnxruntime
from onnx import TensorProto, helper, numpy_helper

from sensitivity.layers import find_layers
from sensitivity.normalize import normalize_model

RNG = np.random.default_rng(0)
W = RNG.normal(size=(3, 4)).astype(np.float32)


def _model(weight_nodes: list[onnx.NodeProto], extra_outputs: Sequence[str] = ()) -> onnx.ModelProto:
    """y = x @ w, with w computed from the initializer W0 by ``weight_nodes``."""
    nodes = [*weight_nodes, helper.make_node("MatMul", ["x", "w"], ["y"], name="fc/MatMul")]
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("y", *extra_outputs)]
    graph = helper.make_graph(
        nodes,
        "fold",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        outputs,
        initializer=[numpy_helper.from_array(W, "W0")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _transposed() -> onnx.ModelProto:
    return _model([helper.make_node("Transpose", ["W0"], ["w"], perm=[1, 0])])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["y"], {"x": x})[0]


def test_a_transposed_constant_weight_becomes_one_initializer_and_a_layer() -> None:
    normalized = normalize_model(_transposed())
    assert normalized.folded_weights == ("w",)
    assert [layer.name for layer in find_layers(normalized.model)] == ["w"]
    initializers = {init.name: numpy_helper.to_array(init) for init in normalized.model.graph.initializer}
    assert list(initializers) == ["w"]  # W0 is read by nothing else: dropped, the file holds one copy
    np.testing.assert_array_equal(initializers["w"], W.T)  # bit-identical: data movement only
    x = RNG.normal(size=(5, 4)).astype(np.float32)
    np.testing.assert_array_equal(_run(normalized.model, x), _run(_transposed(), x))
    assert "1 weights computed from constants by data-movement ops were folded into initializers: w" in (
        normalized.changes()
    )


def test_a_gate_reordering_chain_with_shape_constants_is_folded() -> None:
    """torch's LSTM export: Slice the rows, Concat them in another order, Unsqueeze a direction axis."""

    def const(name: str, values: list[int]) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(values, np.int64), name))

    nodes = [
        const("s0", [0]),
        const("e0", [2]),
        const("s1", [2]),
        const("e1", [3]),
        const("axes", [0]),
        helper.make_node("Slice", ["W0", "s0", "e0"], ["top"]),
        helper.make_node("Slice", ["W0", "s1", "e1"], ["bottom"]),
        helper.make_node("Concat", ["bottom", "top"], ["rows"], axis=0),
        helper.make_node("Transpose", ["rows"], ["w"], perm=[1, 0]),
    ]
    normalized = normalize_model(_model(nodes))
    assert normalized.folded_weights == ("w",)
    assert [node.op_type for node in normalized.model.graph.node] == ["MatMul"]
    folded = numpy_helper.to_array(normalized.model.graph.initializer[0])
    np.testing.assert_array_equal(folded, np.concatenate([W[2:3], W[0:2]]).T)


def test_arithmetic_on_a_weight_is_not_folded() -> None:
    """A Mul could round: the weight stays a computed value (and no layer), as the exporter wrote it."""
    scale = helper.make_node("Constant", [], ["two"], value=numpy_helper.from_array(np.array(2.0, np.float32), "two"))
    model = _model(
        [
            scale,
            helper.make_node("Mul", ["W0", "two"], ["scaled"]),
            helper.make_node("Transpose", ["scaled"], ["w"], perm=[1, 0]),
        ]
    )
    normalized = normalize_model(model)
    assert normalized.folded_weights == () and find_layers(normalized.model) == []


def test_a_constant_read_elsewhere_is_kept() -> None:
    model = _model(
        [helper.make_node("Transpose", ["W0"], ["w"], perm=[1, 0]), helper.make_node("Identity", ["W0"], ["W0_out"])],
        extra_outputs=["W0_out"],
    )
    normalized = normalize_model(model)
    assert normalized.folded_weights == ("w",)
    assert sorted(init.name for init in normalized.model.graph.initializer) == ["W0", "w"]


def test_a_chain_the_reference_evaluator_cannot_run_is_left_as_written(monkeypatch) -> None:
    import sensitivity.fold

    def refuse(*args, **kwargs):
        raise NotImplementedError("no reference implementation")

    monkeypatch.setattr(sensitivity.fold, "_evaluate", refuse)
    normalized = normalize_model(_transposed())
    assert normalized.folded_weights == () and find_layers(normalized.model) == []
    assert [node.op_type for node in normalized.model.graph.node] == ["Transpose", "MatMul"]

"""The one-node harness of the op tests: a ``Case`` is one op with its inputs and attributes, built
as a one-node graph (inputs wrapped in ``C(...)`` become initializers, ``None`` is an omitted optional
input, everything else a graph input), run in onnxruntime and compared with the interpreter's outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper, numpy_helper

RTOL = 1e-4


@dataclass(frozen=True)
class C:
    """An input stored as an initializer (a constant of the graph)."""

    value: np.ndarray


@dataclass
class Case:
    op: str
    inputs: list[Any]
    attrs: dict[str, Any] = field(default_factory=dict)
    opsets: tuple[int, ...] = (13,)
    outputs: int = 1
    tag: str = ""


def case(op: str, *inputs: Any, opsets: tuple[int, ...] = (13,), outputs: int = 1, tag: str = "", **attrs: Any) -> Case:
    return Case(op, list(inputs), attrs, opsets, outputs, tag)


def build(c: Case, opset: int) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A one-node model for the case, and the feeds for its graph inputs."""
    names, graph_inputs, initializers, feeds = [], [], [], {}
    for index, value in enumerate(c.inputs):
        name = f"in{index}"
        if value is None:
            names.append("")
        elif isinstance(value, C):
            names.append(name)
            initializers.append(numpy_helper.from_array(value.value, name))
        else:
            names.append(name)
            element = helper.np_dtype_to_tensor_dtype(value.dtype)
            graph_inputs.append(helper.make_tensor_value_info(name, element, value.shape))
            feeds[name] = value
    outputs = [f"out{i}" for i in range(c.outputs)]
    node = helper.make_node(c.op, names, outputs, name=f"{c.op.lower()}_node", **c.attrs)
    graph = helper.make_graph(
        [node], "case", graph_inputs, [onnx.ValueInfoProto(name=n) for n in outputs], initializers
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8 if opset <= 18 else 10
    return model, feeds


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    difference = np.linalg.norm((actual.astype(np.float64) - expected.astype(np.float64)).ravel())
    return float(difference / max(float(np.linalg.norm(expected.astype(np.float64).ravel())), 1e-12))


def run_onnxruntime(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def assert_parity(expected: list[np.ndarray], actual: list[torch.Tensor]) -> float:
    assert len(actual) == len(expected)
    worst = 0.0
    for want, got in zip(expected, actual):
        got_array = got.detach().numpy()
        assert got_array.shape == want.shape, (got_array.shape, want.shape)
        if np.issubdtype(want.dtype, np.floating):
            worst = max(worst, relative_error(got_array, want))
        else:
            np.testing.assert_array_equal(got_array, want.astype(got_array.dtype))
    assert worst <= RTOL, worst
    return worst

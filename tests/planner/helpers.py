"""Helpers of the planner tests (plain builders; the models shared with other areas are in ``tests/models.py``)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def embedding_model() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """ids [N, 5] -> Gather from a [12, 6] table -> mean over tokens -> MatMul [6, 3]."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "ids"], ["embedded"], name="lookup"),
            helper.make_node("ReduceMean", ["embedded"], ["pooled"], name="pool", axes=[1], keepdims=0),
            helper.make_node("MatMul", ["pooled", "head"], ["logits"], name="project"),
        ],
        "embedding",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 5])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        [
            numpy_helper.from_array(rng.standard_normal((12, 6)).astype(np.float32), "table"),
            numpy_helper.from_array(rng.standard_normal((6, 3)).astype(np.float32), "head"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model, {"ids": rng.integers(0, 12, (64, 5))}

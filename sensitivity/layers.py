"""Quantizable layers of an ONNX graph: Conv, ConvTranspose, Gemm, MatMul with a constant weight,
and Gather from a constant 2-D float table (an embedding).

A layer is named by its weight initializer; that name is its key everywhere (DESIGN.md).
This module only reads the graph protobuf; it never runs anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import onnx
from onnx import numpy_helper

QUANTIZABLE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Gather")
# A Gather's other input is integer indices: only its weight (the table) can be quantized, so the
# candidates that also quantize activations store its weight alone (DESIGN.md's w8a8 = w8 there).
ACTIVATION_FREE_OPS = ("Gather",)
_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)


@dataclass(frozen=True)
class Layer:
    name: str  # the weight initializer's name
    node_name: str
    op_type: str
    shape: tuple[int, ...]
    num_params: int
    channel_axis: int  # the output-channel axis of the weight, for per-channel quantization

    @property
    def weight_index(self) -> int:
        """Which input of its node the weight is."""
        return weight_index(self.op_type)

    @property
    def has_float_input(self) -> bool:
        """Whether the node has a float activation input that a8 candidates quantize."""
        return self.op_type not in ACTIVATION_FREE_OPS


def weight_index(op_type: str) -> int:
    return 0 if op_type == "Gather" else 1


def _attribute(node: onnx.NodeProto, name: str, default: int) -> int:
    for attr in node.attribute:
        if attr.name == name:
            return int(onnx.helper.get_attribute_value(attr))
    return default


def _weight_input(node: onnx.NodeProto, initializers: Mapping[str, onnx.TensorProto]) -> str | None:
    if node.op_type == "Gather":  # an embedding: rows of a float table picked by integer ids
        table = initializers.get(node.input[0])
        is_table = table is not None and table.data_type in _FLOAT_TYPES and _attribute(node, "axis", 0) == 0
        return node.input[0] if is_table else None
    if node.op_type in ("Conv", "ConvTranspose", "Gemm"):
        return node.input[1] if len(node.input) > 1 and node.input[1] in initializers else None
    if node.op_type == "MatMul":  # x @ W with W constant; a constant left operand is not a layer
        return node.input[1] if node.input[1] in initializers else None
    return None


def _channel_axis(node: onnx.NodeProto, rank: int) -> int:
    if node.op_type == "Conv":
        return 0  # [O, I/g, k...]
    if node.op_type == "ConvTranspose":
        return 1  # [I, O/g, k...]
    if node.op_type == "Gemm":
        return 0 if _attribute(node, "transB", 0) else 1  # B is [N, K] when transposed, else [K, N]
    if node.op_type == "Gather":
        return 0  # one scale per row: each token's embedding, as embedding quantizers do
    return rank - 1  # MatMul: [..., K, N]


def find_layers(model: onnx.ModelProto) -> list[Layer]:
    """Layers in graph order. A weight shared by several nodes is listed once (first use)."""
    initializers = {init.name: init for init in model.graph.initializer}
    layers: list[Layer] = []
    seen: set[str] = set()
    for index, node in enumerate(model.graph.node):
        if node.op_type not in QUANTIZABLE_OPS:
            continue
        weight_name = _weight_input(node, initializers)
        if weight_name is None or weight_name in seen:
            continue
        shape = tuple(int(d) for d in initializers[weight_name].dims)
        if len(shape) < 2:
            continue
        seen.add(weight_name)
        num_params = 1
        for dim in shape:
            num_params *= dim
        layers.append(
            Layer(
                name=weight_name,
                node_name=node.name or f"{node.op_type}_{index}",
                op_type=node.op_type,
                shape=shape,
                num_params=num_params,
                channel_axis=_channel_axis(node, len(shape)),
            )
        )
    return layers


def weight_array(model: onnx.ModelProto, name: str):
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    raise KeyError(f"no initializer named {name!r}")

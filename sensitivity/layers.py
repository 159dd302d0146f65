"""Quantizable layers of an ONNX graph: Conv, ConvTranspose, Gemm, MatMul with a constant weight,
Gather from a constant 2-D float table (an embedding), and the W and R weights of LSTM and GRU
(two layers per node, each named by its own initializer).

LSTM/GRU weights are [num_directions, G·hidden, K] (K = input size for W, hidden for R; G = 4
gates for LSTM, 3 for GRU). Their channel axis is 1: one scale per gate row, i.e. per output
unit of each gate, as for a Gemm's output channels; a row's scale is shared by the directions
of a bidirectional layer (per-channel quantization has one axis).

A layer is named by its weight initializer; that name is its key everywhere (DESIGN.md). Exporters
often give anonymous initializer names (``onnx::MatMul_984``), so every report shows the layer's
node name and **scope** beside it: the path of modules the node came from, written as TorchScript's
``torch.onnx.export`` writes node names (``/encoder/layer.0/attention/self/query``; see ``node_scope``).
This module only reads the graph protobuf; it never runs anything.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import onnx
from onnx import numpy_helper

RECURRENT_OPS = ("LSTM", "GRU")
QUANTIZABLE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Gather", *RECURRENT_OPS)
# A Gather's other input is integer indices: only its weight (the table) can be quantized, so the
# candidates that also quantize activations store its weight alone (DESIGN.md's w8a8 = w8 there).
ACTIVATION_FREE_OPS = ("Gather",)
# Ops whose quantized candidates store the weight alone: a Gather has no float input, and
# onnxruntime's QDQ quantizer has no recurrent ops, so an LSTM/GRU input stays float
# (the exporter writes its W and R behind a DequantizeLinear: docs/export.md).
WEIGHT_ONLY_OPS = (*ACTIVATION_FREE_OPS, *RECURRENT_OPS)
_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)


@dataclass(frozen=True)
class Layer:
    name: str  # the weight initializer's name
    node_name: str
    op_type: str
    shape: tuple[int, ...]
    num_params: int
    channel_axis: int  # the output-channel axis of the weight, for per-channel quantization
    input_index: int | None = None  # which input of its node the weight is (None: weight_index(op_type))
    scope: str = ""  # the module path of its node, "/encoder/layer.0/attention/self/query" ("" if unknown)

    @property
    def weight_index(self) -> int:
        """Which input of its node the weight is (an LSTM/GRU has two: W is 1, R is 2)."""
        return weight_index(self.op_type) if self.input_index is None else self.input_index

    @property
    def has_float_input(self) -> bool:
        """Whether a8 candidates quantize the node's input activation too (see WEIGHT_ONLY_OPS)."""
        return self.op_type not in WEIGHT_ONLY_OPS


def weight_index(op_type: str) -> int:
    """The (first) weight input of an op type."""
    return 0 if op_type == "Gather" else 1


def node_weight_index(op_type: str, layer: Layer) -> int:
    """Where ``layer``'s weight is among the inputs of a node of ``op_type`` that reads it: a
    tied weight feeds nodes of several op types (a Gather table and a MatMul), and an LSTM/GRU
    reads two layers (W and R)."""
    return layer.weight_index if op_type in RECURRENT_OPS else weight_index(op_type)


def weight_indices(op_type: str) -> tuple[int, ...]:
    """Every input of an op type that can be a layer's weight."""
    return (1, 2) if op_type in RECURRENT_OPS else (weight_index(op_type),)


def _attribute(node: onnx.NodeProto, name: str, default: int) -> int:
    for attr in node.attribute:
        if attr.name == name:
            return int(onnx.helper.get_attribute_value(attr))
    return default


def _weight_inputs(node: onnx.NodeProto, initializers: Mapping[str, onnx.TensorProto]) -> list[tuple[int, str]]:
    """(input index, initializer name) of each weight of the node that is a layer."""
    if node.op_type in RECURRENT_OPS:  # W and R; B (biases) and P (peepholes) stay float
        return [(i, node.input[i]) for i in (1, 2) if len(node.input) > i and node.input[i] in initializers]
    name = _weight_input(node, initializers)
    return [] if name is None else [(weight_index(node.op_type), name)]


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
    if node.op_type in RECURRENT_OPS:
        return 1  # [directions, G·hidden, K]: one scale per gate row (module docstring)
    return rank - 1  # MatMul: [..., K, N]


def find_layers(model: onnx.ModelProto) -> list[Layer]:
    """Layers in graph order. A weight shared by several nodes is listed once (first use)."""
    initializers = {init.name: init for init in model.graph.initializer}
    layers: list[Layer] = []
    seen: set[str] = set()
    for index, node in enumerate(model.graph.node):
        if node.op_type not in QUANTIZABLE_OPS:
            continue
        for input_index, weight_name in _weight_inputs(node, initializers):
            shape = tuple(int(d) for d in initializers[weight_name].dims)
            if weight_name in seen or len(shape) < 2:
                continue
            seen.add(weight_name)
            layers.append(
                Layer(
                    name=weight_name,
                    node_name=node.name or f"{node.op_type}_{index}",
                    op_type=node.op_type,
                    shape=shape,
                    num_params=math.prod(shape),
                    channel_axis=_channel_axis(node, len(shape)),
                    input_index=input_index,
                    scope=node_scope(node),
                )
            )
    return layers


# Node metadata torch's dynamo exporter (torch.onnx.export(dynamo=True)) writes: "namespace" is
# ": __main__.M/enc.0: __main__.Block/enc.0.fc: torch.nn.modules.linear.Linear/linear: aten.linear.default",
# one "qualified module name: class" per module the op ran in, then the op itself.
NAMESPACE_KEY = "namespace"
MAX_SCOPE_LENGTH = 1024  # metadata is the uploader's text: bound what is read and shown


def node_scope(node: onnx.NodeProto) -> str:
    """The module path of ``node``: from the dynamo exporter's ``namespace`` metadata when present, else
    the node name's directories when it is a path (TorchScript exports name nodes
    ``/encoder/layer.0/attention/self/query/MatMul``; the scope drops the op's own last component).
    Empty when neither says anything."""
    for prop in node.metadata_props:
        if prop.key == NAMESPACE_KEY and len(prop.value) <= MAX_SCOPE_LENGTH:
            # each entry "qualified.name: type"; the last entry is the op itself, not a module
            entries = prop.value.split("/")[:-1]
            return scope_path([entry.split(": ", 1)[0].strip() for entry in entries])
    name = node.name[:MAX_SCOPE_LENGTH]
    return name.rsplit("/", 1)[0] if "/" in name.strip("/") else ""


def scope_path(qualified_names: Sequence[str]) -> str:
    """``["", "enc.0", "enc.0.fc"]`` (the qualified names of the nested modules, outermost first, as
    torch's nn_module_stack and the dynamo exporter list them) -> ``"/enc.0/fc"``: each module by its
    name within its parent, as TorchScript's node names write them. A name that does not extend its
    parent's is written whole."""
    parts, parent = [], ""
    for name in qualified_names:
        if not name or name == parent:
            continue
        parts.append(name[len(parent) + 1 :] if parent and name.startswith(parent + ".") else name)
        parent = name
    return "/" + "/".join(parts) if parts else ""


def weight_array(model: onnx.ModelProto, name: str):
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    raise KeyError(f"no initializer named {name!r}")

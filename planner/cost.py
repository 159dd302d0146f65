"""Computed costs of a configuration: model size in bytes and BOPS (MACs x weight bits x activation bits).

MACs come from the layer output shapes at the dataset's batch shape. ONNX shape inference gives
them for most models; where it leaves a layer's shape unknown (custom-domain ops, data-dependent
reshapes), the float model is run once in onnxruntime on zeros of that shape and the shapes are read
off the real tensors. Latency is measured, never estimated here (see ``planner.latency``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

from planner.candidates import (
    FLOAT_BITS,
    Configuration,
    as_configuration,
    get_candidate,
)
from sensitivity.layers import (
    ACTIVATION_FREE_OPS,
    QUANTIZABLE_OPS,
    RECURRENT_OPS,
    WEIGHT_ONLY_OPS,
    Layer,
    find_layers,
    weight_indices,
)

FLOAT_BYTES = 4
FLOAT16_BYTES = 2
SCALE_BYTES = 4  # one float32 scale per output channel

BatchShape = Sequence[int] | Mapping[str, Sequence[int]]


class ShapesUnknown(ValueError):
    """Static shape inference left some layer's tensor shapes unknown, and running the model was not
    allowed (the service's up-front checks never run an uploaded graph)."""


@dataclass(frozen=True)
class LayerCost:
    name: str
    op_type: str
    macs: int  # multiply-accumulates of one batch, summed over every node that uses this weight
    num_params: int
    channels: int  # output channels: one scale and one zero point each when quantized


@dataclass(frozen=True)
class CostTable(Mapping[str, LayerCost]):
    """Per-layer costs (a read-only ``Mapping[layer, LayerCost]``) plus the bytes outside layers."""

    layers: Mapping[str, LayerCost]
    other_initializer_bytes: int  # biases, norms, shape constants, ...: stored unchanged by every configuration
    batch_shape: Mapping[str, tuple[int, ...]]
    # The serialized float model less its initializers' data: nodes, names, metadata. Every artifact
    # holds them too (the tiny test transformer: 20 kB of a 23.5 kB file, its weights 3-4 kB at 4-8 bits).
    graph_bytes: int = 0
    # With a latency table (planner.latency_table.with_latency_costs): the predicted latency no
    # configuration changes, so that a configuration's predicted ms = this + its "latency" cost.
    latency_offset_ms: float | None = None

    @property
    def fixed_size_bytes(self) -> int:
        """Bytes of the model file that no configuration changes."""
        return self.other_initializer_bytes + self.graph_bytes

    def __getitem__(self, layer: str) -> LayerCost:
        return self.layers[layer]

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)


@dataclass(frozen=True)
class Cost:
    size_bytes: int
    bops: int


def layer_nodes(model: onnx.ModelProto, layers: Sequence[Layer] | None = None) -> dict[str, list[onnx.NodeProto]]:
    """Every node that uses each layer's weight as its weight operand (a shared weight has several)."""
    layers = find_layers(model) if layers is None else layers
    nodes: dict[str, list[onnx.NodeProto]] = {layer.name: [] for layer in layers}
    for node in model.graph.node:
        if node.op_type not in QUANTIZABLE_OPS or len(node.input) < 2:
            continue
        for index in weight_indices(node.op_type):
            if index < len(node.input) and node.input[index] in nodes:
                nodes[node.input[index]].append(node)
    return nodes


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Inputs that must be fed (old exporters also list initializers as graph inputs)."""
    initializers = {init.name for init in model.graph.initializer}
    return [value for value in model.graph.input if value.name not in initializers]


def normalize_batch_shape(model: onnx.ModelProto, batch_shape: BatchShape) -> dict[str, tuple[int, ...]]:
    """A shape per graph input; a bare shape is accepted for a single-input model."""
    names = [value.name for value in graph_inputs(model)]
    if not isinstance(batch_shape, Mapping):
        if len(names) != 1:
            raise ValueError(f"the model has inputs {names}; give the batch shape as a mapping input name -> shape")
        batch_shape = {names[0]: batch_shape}
    missing = [name for name in names if name not in batch_shape]
    unknown = [name for name in batch_shape if name not in names]
    if missing or unknown:
        raise ValueError(f"batch shape does not match the model inputs {names}: missing {missing}, unknown {unknown}")
    shapes = {name: tuple(int(d) for d in batch_shape[name]) for name in names}
    bad = {name: shape for name, shape in shapes.items() if any(d <= 0 for d in shape)}
    if bad:
        raise ValueError(f"batch shape dimensions must be positive, got {bad}")
    return shapes


def inferred_shapes(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, ...]]:
    """Static tensor shapes from ONNX shape inference with the inputs fixed; unknown ones are left out."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for value in fixed.graph.input:
        if value.name in input_shapes:
            dims = value.type.tensor_type.shape.dim
            del dims[:]
            for size in input_shapes[value.name]:
                dims.add().dim_value = int(size)
    try:
        fixed = onnx.shape_inference.infer_shapes(fixed, strict_mode=False, data_prop=True)
    except Exception:
        return {name: tuple(int(d) for d in shape) for name, shape in input_shapes.items()}
    shapes: dict[str, tuple[int, ...]] = {}
    for value in [*fixed.graph.input, *fixed.graph.value_info, *fixed.graph.output]:
        shape = _static_shape(value)
        if shape is not None:
            shapes[value.name] = shape
    return shapes


def runtime_tensors(
    model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], names: Sequence[str] | None = None
) -> dict[str, np.ndarray]:
    """Run the model once in onnxruntime and return the named intermediate tensors (default: all node outputs).

    Used where shape or type inference is incomplete: the real tensors give exact shapes and dtypes.
    """
    wanted = list(dict.fromkeys(names if names is not None else [o for n in model.graph.node for o in n.output if o]))
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {value.name for value in probe.graph.output}
    for name in wanted:
        if name not in existing:
            # No type given: onnxruntime fills it in from its own inference when it builds the graph.
            probe.graph.output.append(onnx.ValueInfoProto(name=name))
    outputs = cpu_session(probe.SerializeToString()).run(wanted, dict(feeds))
    return dict(zip(wanted, outputs, strict=True))


def cpu_session(model_bytes: bytes) -> Any:
    """An onnxruntime CPU session (``InferenceSession``: onnxruntime ships no types) that logs errors
    only (not its warnings about every model quirk)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def layer_cost_table(model: onnx.ModelProto, batch_shape: BatchShape, *, run_model: bool = True) -> CostTable:
    """MACs and parameter counts of every layer at ``batch_shape`` (e.g. ``(1, 1, 8, 8)``).

    Where static shape inference falls short, the model is run once in onnxruntime; with
    ``run_model=False`` that raises ``ShapesUnknown`` instead.
    """
    input_shapes = normalize_batch_shape(model, batch_shape)
    layers = find_layers(model)
    nodes = layer_nodes(model, layers)
    needed = {
        name
        for node_list in nodes.values()
        for node in node_list
        if node.op_type not in ACTIVATION_FREE_OPS  # no MACs: a lookup
        for name in _mac_tensors(node)
    }
    shapes = inferred_shapes(model, input_shapes)
    if not needed <= set(shapes):
        unknown = sorted(needed - set(shapes))
        if not run_model:
            raise ShapesUnknown(
                f"static shape inference leaves {len(unknown)} layer tensors unknown, e.g. {unknown[0]!r}"
            )
        shapes.update(_runtime_shapes(model, input_shapes, unknown))
    weights = {layer.name: layer.shape for layer in layers}
    table = {
        layer.name: LayerCost(
            name=layer.name,
            op_type=layer.op_type,
            macs=sum(node_macs(node, weights[layer.name], shapes) for node in nodes[layer.name]),
            num_params=layer.num_params,
            channels=layer.shape[layer.channel_axis],
        )
        for layer in layers
    }
    other, graph = unchanged_bytes(model, set(table))
    return CostTable(layers=table, other_initializer_bytes=other, batch_shape=input_shapes, graph_bytes=graph)


def unchanged_bytes(model: onnx.ModelProto, layer_names: set[str]) -> tuple[int, int]:
    """(the initializers that are not layers, the graph's own bytes): what no configuration changes."""
    other = sum(initializer_bytes(init) for init in model.graph.initializer if init.name not in layer_names)
    data = sum(initializer_bytes(init) for init in model.graph.initializer)
    return other, max(model.ByteSize() - data, 0)


def _mac_tensors(node: onnx.NodeProto) -> tuple[str, ...]:
    """The tensors whose shapes ``node_macs`` reads (an LSTM/GRU's Y may be omitted: X suffices)."""
    return (node.input[0],) if node.op_type in RECURRENT_OPS else (node.input[0], node.output[0])


def node_macs(node: onnx.NodeProto, weight_shape: Sequence[int], shapes: Mapping[str, Sequence[int]]) -> int:
    """Multiply-accumulates of one Conv / ConvTranspose / Gemm / MatMul / LSTM / GRU node with one of
    its weights, from its tensor shapes; none for a Gather (a table lookup)."""
    if node.op_type in ACTIVATION_FREE_OPS:
        return 0
    if node.op_type in RECURRENT_OPS:
        # W [D, G·H, I] multiplies every step's input, R [D, G·H, H] every step's state: one
        # product of the weight's size per (step, batch entry), whatever the layout
        return math.prod(shapes[node.input[0]][:-1]) * math.prod(weight_shape)
    output_elements = math.prod(shapes[node.output[0]])
    if node.op_type == "Conv":  # each output element: (C_in / group) * kernel MACs; W is [O, I/g, k...]
        return output_elements * math.prod(weight_shape[1:])
    if node.op_type == "ConvTranspose":  # each input element scatters into (C_out / group) * kernel outputs
        return math.prod(shapes[node.input[0]]) * math.prod(weight_shape[1:])
    if node.op_type == "Gemm":
        trans_b = any(a.name == "transB" and a.i for a in node.attribute)
        reduction = weight_shape[1] if trans_b else weight_shape[0]
        return output_elements * reduction
    if node.op_type == "MatMul":  # [..., K] @ [..., K, N]
        return output_elements * weight_shape[-2]
    raise ValueError(f"no MAC formula for op type {node.op_type!r}")


def layer_size_bytes(cost: LayerCost, candidate: str) -> int:
    """Stored bytes of one layer's weight at a candidate (4-bit weights packed two per byte)."""
    chosen = get_candidate(candidate)
    bits = chosen.weight_bits
    if bits is None:
        return FLOAT_BYTES * cost.num_params
    if chosen.float16:  # float16 values, no scales or zero points
        return FLOAT16_BYTES * cost.num_params
    weights = math.ceil(cost.num_params * bits / 8)
    zero_points = math.ceil(cost.channels * bits / 8)  # zero points have the weight's type
    return weights + SCALE_BYTES * cost.channels + zero_points


def layer_bops(cost: LayerCost, candidate: str) -> int:
    chosen = get_candidate(candidate)
    # an LSTM/GRU's input stays float whatever the candidate (the exporter quantizes its weights
    # alone: WEIGHT_ONLY_OPS), so its products count float activation bits
    activation_bits = FLOAT_BITS if cost.op_type in WEIGHT_ONLY_OPS else chosen.effective_activation_bits
    return cost.macs * chosen.effective_weight_bits * activation_bits


def configuration_cost(table: CostTable, configuration: Configuration | Mapping[str, str]) -> Cost:
    """Size in bytes and BOPS of a configuration (validated against the table's layers)."""
    configuration = as_configuration(configuration).validate(list(table))
    size = table.fixed_size_bytes + sum(layer_size_bytes(table[name], c) for name, c in configuration.items())
    bops = sum(layer_bops(table[name], candidate) for name, candidate in configuration.items())
    return Cost(size_bytes=int(size), bops=int(bops))


def initializer_bytes(tensor: onnx.TensorProto) -> int:
    """Bytes of a tensor's data (4-bit types packed two per byte)."""
    count: int = math.prod(tensor.dims)
    if tensor.data_type in (TensorProto.INT4, TensorProto.UINT4):
        return math.ceil(count / 2)
    if tensor.data_type == TensorProto.STRING:
        return sum(len(s) for s in tensor.string_data)
    return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def _static_shape(value: onnx.ValueInfoProto) -> tuple[int, ...] | None:
    if not value.type.HasField("tensor_type") or not value.type.tensor_type.HasField("shape"):
        return None
    dims = value.type.tensor_type.shape.dim
    if any(not d.HasField("dim_value") or d.dim_value <= 0 for d in dims):
        return None
    return tuple(int(d.dim_value) for d in dims)


def _runtime_shapes(
    model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]], names: Sequence[str]
) -> dict[str, tuple[int, ...]]:
    dtypes = {value.name: _input_dtype(value) for value in graph_inputs(model)}
    feeds = {name: np.zeros(shape, dtype=dtypes[name]) for name, shape in input_shapes.items()}
    return {name: tuple(array.shape) for name, array in runtime_tensors(model, feeds, names).items()}


def _input_dtype(value: onnx.ValueInfoProto) -> np.dtype:
    elem_type = value.type.tensor_type.elem_type
    if not elem_type:
        raise ValueError(f"input {value.name!r} has no tensor type")
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))

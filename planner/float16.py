"""The ``fp16`` candidate's graph edit: a layer's weight stored in float16, its nodes computing in float16.

The weight is Q_16(W) (``sensitivity.quantize.to_float16``: onnxruntime's float16 converter's
clamps, then rounding), so the exported weights are the ones the sensitivity analysis perturbed by.
A node whose every layer is at ``fp16`` computes in float16: its float activation inputs are Cast
to float16, its other float initializers (a Conv or Gemm bias) stored in float16, and each output
Cast back to float32 under its own name, so the rest of the graph is untouched. A node that also
reads a layer at another candidate (an LSTM's W at fp16, its R at w8) keeps computing in float32:
the float16 weight reaches it through a Cast to float32 (float16 storage, Q_16's values).

Written by hand, not with ``onnxruntime.transformers.float16.convert_float_to_float16``: with a
``node_block_list`` (everything but the fp16 layers' nodes) that converter still turns every other
tensor into float16 and wraps each blocked node in Casts to float32 and back, so the float32 parts
of the graph would be rounded to float16 between every two nodes (on the digits CNN with two layers
at fp16 it wrote 16 Casts where 4 do, float16 between the Relu, MaxPool and Flatten nodes it was
told to keep), and its output was not topologically sorted (``onnx.checker`` refused it). That
converter is what the clamps of Q_16 follow.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import onnx
from onnx import TensorProto, numpy_helper

from sensitivity.layers import RECURRENT_OPS, Layer, node_weight_index, weight_array
from sensitivity.quantize import to_float16

# Inputs that are never float, by op type (indices of a Gather, sequence lengths of a recurrent op).
_NON_FLOAT_INPUTS = {"Gather": (1,), **{op: (4,) for op in RECURRENT_OPS}}
FLOAT16_SUFFIX = "_fp16"


def convert_layers_to_float16(
    model: onnx.ModelProto, layers: Sequence[Layer], nodes: Mapping[str, Sequence[str]], fp16: Sequence[str]
) -> None:
    """Edit ``model`` in place: the layers named in ``fp16`` get float16 weights; every node whose
    layers are all in ``fp16`` computes in float16 (module doc). ``nodes``: each layer's node names."""
    chosen = set(fp16)
    by_name = {layer.name: layer for layer in layers}
    taken = _taken_names(model)
    for name in fp16:
        _store_float16_weight(model, name, taken)
    reads: dict[str, list[str]] = {}
    for layer, node_names in nodes.items():
        for node_name in node_names:
            reads.setdefault(node_name, []).append(layer)
    computing = {node for node, read in reads.items() if set(read) <= chosen and chosen & set(read)}
    initializers = {init.name: init for init in model.graph.initializer}
    edited: list[onnx.NodeProto] = []
    for node in model.graph.node:
        read = [layer for layer in reads.get(node.name, []) if layer in chosen]
        if node.name in computing:
            edited += _compute_in_float16(model, node, initializers, taken)
        elif read:
            edited += _cast_weights_up(node, [by_name[layer] for layer in read], taken)
            edited.append(node)
        else:
            edited.append(node)
    del model.graph.node[:]
    model.graph.node.extend(edited)
    # the float32 weights and biases now read in float16 by every node that read them
    replaced = set(fp16) | {init.name[: -len(FLOAT16_SUFFIX)] for init in model.graph.initializer if _is_copy(init)}
    _remove_unused(model, replaced)


def float16_weight_name(layer: str) -> str:
    return layer + FLOAT16_SUFFIX


def _taken_names(model: onnx.ModelProto) -> set[str]:
    graph = model.graph
    return (
        {init.name for init in graph.initializer}
        | {out for node in graph.node for out in node.output}
        | {value.name for value in graph.input}
        | {node.name for node in graph.node}
    )


def _store_float16_weight(model: onnx.ModelProto, layer: str, taken: set[str]) -> None:
    name = float16_weight_name(layer)
    if name in taken:
        raise ValueError(f"cannot store layer {layer!r} in float16: the name {name!r} is taken")
    taken.add(name)
    model.graph.initializer.append(numpy_helper.from_array(to_float16(weight_array(model, layer)), name))


def _compute_in_float16(
    model: onnx.ModelProto, node: onnx.NodeProto, initializers: Mapping[str, onnx.TensorProto], taken: set[str]
) -> list[onnx.NodeProto]:
    """Casts in, the node on float16 tensors, Casts out (each output keeps its name and float32 type)."""
    before: list[onnx.NodeProto] = []
    non_float = _NON_FLOAT_INPUTS.get(node.op_type, ())
    for index, tensor in enumerate(node.input):
        if not tensor or index in non_float:
            continue
        if float16_weight_name(tensor) in initializers:  # a layer's weight, stored by _store_float16_weight
            node.input[index] = float16_weight_name(tensor)
        elif tensor in initializers:
            if initializers[tensor].data_type == TensorProto.FLOAT:
                node.input[index] = _float16_copy(model, initializers[tensor], taken)
        else:
            cast = unique_name(f"{tensor}_cast{FLOAT16_SUFFIX}", taken)
            before.append(_cast(tensor, cast, TensorProto.FLOAT16, taken))
            node.input[index] = cast
    after = []
    for index, tensor in enumerate(node.output):
        if not tensor:
            continue
        half = unique_name(tensor + FLOAT16_SUFFIX, taken)
        node.output[index] = half
        after.append(_cast(half, tensor, TensorProto.FLOAT, taken))
    return [*before, node, *after]


def _float16_copy(model: onnx.ModelProto, tensor: onnx.TensorProto, taken: set[str]) -> str:
    """A float16 copy of a float initializer (a bias) beside it; the original goes if nothing else reads it."""
    name = unique_name(tensor.name + FLOAT16_SUFFIX, taken)
    model.graph.initializer.append(numpy_helper.from_array(to_float16(numpy_helper.to_array(tensor)), name))
    return name


def _cast_weights_up(node: onnx.NodeProto, layers: Sequence[Layer], taken: set[str]) -> list[onnx.NodeProto]:
    """A float32 node reading float16 weights: each through a Cast to float32."""
    casts = []
    for layer in layers:
        index = node_weight_index(node.op_type, layer)
        output = unique_name(f"{layer.name}_cast_fp32", taken)
        casts.append(_cast(float16_weight_name(layer.name), output, TensorProto.FLOAT, taken))
        node.input[index] = output
    return casts


def _cast(source: str, output: str, to: int, taken: set[str]) -> onnx.NodeProto:
    return onnx.helper.make_node("Cast", [source], [output], name=unique_name(f"{output}_Cast", taken), to=to)


def unique_name(base: str, taken: set[str]) -> str:
    """``base``, or ``base_1``, ``base_2``, ... : the first not in ``taken``, which then holds it."""
    name, suffix = base, 1
    while name in taken:
        name, suffix = f"{base}_{suffix}", suffix + 1
    taken.add(name)
    return name


def _is_copy(tensor: onnx.TensorProto) -> bool:
    return tensor.data_type == TensorProto.FLOAT16 and tensor.name.endswith(FLOAT16_SUFFIX)


def _remove_unused(model: onnx.ModelProto, names: set[str]) -> None:
    """Drop those of ``names`` that no node reads and no graph output is (one pass over the graph)."""
    used = {tensor for node in model.graph.node for tensor in node.input} | {o.name for o in model.graph.output}
    unused = names - used
    kept = [init for init in model.graph.initializer if init.name not in unused]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    kept_inputs = [value for value in model.graph.input if value.name not in unused]
    del model.graph.input[:]
    model.graph.input.extend(kept_inputs)

"""Weights an exporter left as data-movement ops on constants, folded into one initializer each.

torch.onnx's LSTM export reorders the gates of ``weight_ih`` and ``weight_hh`` with Slice, Concat
and Unsqueeze nodes. With its constant folding off (silero-vad's re-export by spox) the LSTM's W
and R are those nodes' outputs, not initializers, so they were not layers (``find_layers`` reads
initializers). A weight input of a layer op (``layers.weight_indices``) computed from constants
by ``FOLDABLE_OPS`` alone becomes an initializer under the same name. These ops move or select
values and never round them, so the folded tensor is bit-identical to what the graph computed;
the nodes and initializers nothing reads any more are dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnx.reference
from onnx import numpy_helper

from sensitivity.branches import DEFAULT_DOMAINS, drop_unread_nodes, node_reads
from sensitivity.layers import QUANTIZABLE_OPS, weight_indices

logger = logging.getLogger(__name__)

FOLDABLE_OPS = frozenset(
    {
        "Concat",
        "Expand",
        "Flatten",
        "Gather",
        "Identity",
        "Reshape",
        "Slice",
        "Split",
        "Squeeze",
        "Tile",
        "Transpose",
        "Unsqueeze",
    }
)
MAX_CHAIN_NODES = 256  # silero's largest chain has 13 (3 Slices, 1 Concat, 1 Unsqueeze, 8 Constants)


def foldable_weights(model: onnx.ModelProto) -> list[str]:
    """Names of the layer-op weight inputs that ``FOLDABLE_OPS`` compute from constants alone."""
    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    producers = {name: node for node in graph.node for name in node.output if name}
    names = []
    for node in graph.node:
        if node.op_type not in QUANTIZABLE_OPS or node.domain not in DEFAULT_DOMAINS:
            continue
        for index in weight_indices(node.op_type):
            name = node.input[index] if len(node.input) > index else ""
            if name and name not in initializers and name not in names and _chain(name, producers, initializers):
                names.append(name)
    return names


def fold_weights(model: onnx.ModelProto, names: Sequence[str]) -> list[str]:
    """Replace each named value by an initializer holding what its chain computes (in place);
    the names folded. A chain onnx's reference evaluator cannot run is left as the exporter wrote
    it (its weight is then no layer, as before)."""
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    producers = {name: node for node in graph.node for name in node.output if name}
    folded = []
    for name in names:
        chain = _chain(name, producers, set(initializers))
        try:
            value = _evaluate(model, chain, initializers, name)
        except Exception as error:
            logger.info("weight %r not folded: %s", name, error)
            continue
        initializers[name] = numpy_helper.from_array(value, name)
        graph.initializer.append(initializers[name])
        folded.append(name)
    if not folded:
        return folded
    kept = [node for node in graph.node if not set(node.output) & set(folded)]  # the initializers replace them
    del graph.node[:]
    graph.node.extend(kept)
    drop_unread_nodes(graph)
    _drop_unread_initializers(graph)
    return folded


def _chain(
    name: str, producers: Mapping[str, onnx.NodeProto], initializers: set[str] | Mapping[str, object]
) -> list[onnx.NodeProto]:
    """The nodes computing ``name`` from initializers, in run order; [] when any of them is not a
    foldable op (or a Constant) or the chain is longer than ``MAX_CHAIN_NODES``."""
    order: list[onnx.NodeProto] = []
    seen: set[str] = set()

    def visit(value: str) -> bool:
        if not value or value in initializers or value in seen:
            return True
        node = producers.get(value)
        if node is None or node.domain not in DEFAULT_DOMAINS or len(order) >= MAX_CHAIN_NODES:
            return False
        if node.op_type != "Constant" and (node.op_type not in FOLDABLE_OPS or not all(map(visit, node.input))):
            return False
        seen.update(node.output)
        order.append(node)
        return True

    return order if visit(name) and order else []


def _evaluate(
    model: onnx.ModelProto, chain: Sequence[onnx.NodeProto], initializers: Mapping[str, onnx.TensorProto], name: str
) -> np.ndarray:
    """What ``chain`` computes for ``name``, by onnx's reference evaluator (numpy; nothing of the
    user's graph but these data-movement ops and constants runs)."""
    read = {value for node in chain for value in node.input}
    graph = onnx.helper.make_graph(
        list(chain),
        "fold",
        [],
        [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.UNDEFINED, None)],
        initializer=[initializers[value] for value in sorted(read) if value in initializers],
    )
    subset = onnx.helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    outputs = onnx.reference.ReferenceEvaluator(subset).run(None, {})
    assert isinstance(outputs, list)  # a dict only for intermediate=True
    return outputs[0]


def _drop_unread_initializers(graph: onnx.GraphProto) -> None:
    """Remove initializers no node (subgraphs included) reads and no graph output names."""
    read = {value.name for value in (*graph.output, *graph.input)}  # (before IR 4 initializers were inputs too)
    read |= {name for node in graph.node for name in node_reads(node)}
    kept = [init for init in graph.initializer if init.name in read]
    if len(kept) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(kept)

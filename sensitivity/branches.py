"""``If`` nodes whose branch the calibration data fixes, replaced by that branch (``fix_branches``).

silero-vad (spox export) holds its whole network in one ``If`` on ``sr == 16000``, its weights as
``Constant`` nodes inside both branches, with further ``If`` nodes nested in each (is a state
given; squeezes of size-1 dims): 5 top-level nodes and 684 in subgraphs. Layers are weights of the
top graph (``find_layers``), and onnxruntime's quantizer rewrites the top graph, so such a model
had no layers at all.

The conditions of the top graph's ``If`` nodes are read in onnxruntime on the calibration batches
(``batches``: for a dynamic batch, the first samples in batches of ``CONDITION_BATCH`` and the
first sample alone, because exporters write ``squeeze``-if-size-1 as an ``If`` on a shape). An
``If`` whose condition takes one value on every batch is replaced by the branch taken; the ``If``
nodes that brings to the top graph are read the same way, up to ``MAX_ROUNDS`` levels deep. The
caller checks the result against the original in onnxruntime (``normalize.check_same_outputs``).

The model is then specialised to what the data does: silero fixed this way computes the 16 kHz
network whatever ``sr`` says (``sr`` stays a graph input, so the artifact keeps the model's
interface). ``FixedBranch.describe`` says so in every report that lists normalisation changes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

logger = logging.getLogger(__name__)

DEFAULT_DOMAINS = ("", "ai.onnx")
CONDITION_BATCH = 8
MAX_ROUNDS = 16  # levels of nesting read; silero has 4


@dataclass(frozen=True)
class FixedBranch:
    """One ``If`` replaced by the branch its condition took on every calibration batch."""

    node: str
    condition: str
    taken: bool

    @property
    def branch(self) -> str:
        return "then_branch" if self.taken else "else_branch"

    def describe(self) -> str:
        return (
            f"If {self.node!r} replaced by its {self.branch}: its condition {self.condition!r} was "
            f"{str(self.taken).lower()} on every calibration batch"
        )


# --- reading subgraphs (also used by the interpreter, sensitivity.onnx_program) -----------------


def is_if(node: onnx.NodeProto) -> bool:
    return node.op_type == "If" and node.domain in DEFAULT_DOMAINS


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    graphs = [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]
    return graphs + [g for a in node.attribute if a.type == onnx.AttributeProto.GRAPHS for g in a.graphs]


def branch(node: onnx.NodeProto, name: str) -> onnx.GraphProto:
    return next(a.g for a in node.attribute if a.name == name)


def free_names(graph: onnx.GraphProto) -> set[str]:
    """Outer-scope names a subgraph reads (through its nested subgraphs too)."""
    defined = {v.name for v in graph.initializer} | {v.name for v in graph.input}
    defined |= {name for node in graph.node for name in node.output}
    read = {name for node in graph.node for name in node_reads(node) if name} | {v.name for v in graph.output}
    return read - defined


def node_reads(node: onnx.NodeProto) -> list[str]:
    """The node's inputs, then the outer-scope values its subgraphs read (implicit inputs: they
    must exist before it runs and live until it has run)."""
    graphs = subgraphs(node)
    if not graphs:
        return list(node.input)
    implicit = set().union(*(free_names(graph) for graph in graphs)) - set(node.input)
    return [*node.input, *sorted(implicit)]


# --- fixing branches ----------------------------------------------------------------------------


def fix_branches(
    model: onnx.ModelProto, batches: Sequence[Mapping[str, np.ndarray]]
) -> tuple[onnx.ModelProto, tuple[FixedBranch, ...]]:
    """``model`` with each top-level ``If`` whose condition is the same on all ``batches``
    replaced by its taken branch, repeatedly; and what was replaced. ``model`` itself is
    returned when nothing is (no ``If`` on the top graph, or no batches)."""
    if not batches or not any(is_if(node) for node in model.graph.node):
        return model, ()
    working: onnx.ModelProto | None = None
    fixed: list[FixedBranch] = []
    for _ in range(MAX_ROUNDS):
        current = model if working is None else working
        taken = _constant_conditions(current, batches)
        if not taken:
            break
        if working is None:
            working = _copy(model)
        fixed += _inline(working, taken)
    if working is None:
        return model, ()
    drop_unread_nodes(working.graph)
    return working, tuple(fixed)


def _constant_conditions(model: onnx.ModelProto, batches: Sequence[Mapping[str, np.ndarray]]) -> dict[str, bool]:
    """Condition name -> its one value, for the top-level Ifs whose condition is the same single
    boolean on every batch (and whose taken branch can be inlined without a name clash)."""
    conditions = sorted({node.input[0] for node in model.graph.node if is_if(node)})
    if not conditions:
        return {}  # (onnxruntime runs every output for an empty list of names)
    values: dict[str, set[bool | None]] = {name: set() for name in conditions}  # None: not one element
    try:
        session = _session_with_outputs(model, conditions)
        runs = [session.run(conditions, dict(feeds)) for feeds in batches]
    except Exception as error:
        logger.info("If conditions not read (%s): no branch fixed", str(error).strip().splitlines()[0])
        return {}
    for run in runs:
        for name, value in zip(conditions, run, strict=True):
            array = np.asarray(value)
            values[name].add(bool(array.reshape(-1)[0]) if array.size == 1 else None)
    same = {name: next(iter(seen)) for name, seen in values.items() if len(seen) == 1}
    return {name: value for name, value in same.items() if value is not None}


def _session_with_outputs(model: onnx.ModelProto, names: Sequence[str]):
    """An onnxruntime session of ``model`` that also outputs the named top-level values."""
    import onnxruntime

    probe = _copy(model)
    outputs = {value.name for value in probe.graph.output}
    probe.graph.output.extend(
        onnx.helper.make_tensor_value_info(name, onnx.TensorProto.BOOL, None) for name in names if name not in outputs
    )
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    return onnxruntime.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _inline(model: onnx.ModelProto, taken: Mapping[str, bool]) -> list[FixedBranch]:
    """Replace each top-level If whose condition is in ``taken`` by that branch's nodes (then one
    Identity per If output); the branch's initializers and value infos join the top graph."""
    graph = model.graph
    names = _all_value_names(graph)
    node_names = {node.name for node in graph.node}
    nodes: list[onnx.NodeProto] = []
    fixed = []
    for index, node in enumerate(graph.node):
        if not (is_if(node) and node.input[0] in taken):
            nodes.append(node)
            continue
        chosen = branch(node, "then_branch" if taken[node.input[0]] else "else_branch")
        label = node.name or f"If_{index}"
        if _produced(chosen) & names:
            nodes.append(node)  # a name clash the ONNX spec forbids; left as a run-time If
            continue
        nodes += _branch_nodes(chosen, node, label, node_names)
        graph.initializer.extend(chosen.initializer)
        graph.value_info.extend(chosen.value_info)
        fixed.append(FixedBranch(label, node.input[0], taken[node.input[0]]))
    del graph.node[:]
    graph.node.extend(nodes)
    return fixed


def _branch_nodes(
    chosen: onnx.GraphProto, node: onnx.NodeProto, label: str, node_names: set[str]
) -> list[onnx.NodeProto]:
    inner = []
    for source in chosen.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(source)
        if copy.name in node_names:
            copy.name = f"{label}/{copy.name}"
        inner.append(copy)
    for position, (value, target) in enumerate(zip(chosen.output, node.output, strict=True)):
        if target:
            inner.append(onnx.helper.make_node("Identity", [value.name], [target], name=f"{label}/output_{position}"))
    return inner


def _produced(graph: onnx.GraphProto) -> set[str]:
    return {init.name for init in graph.initializer} | {name for node in graph.node for name in node.output if name}


def _all_value_names(graph: onnx.GraphProto) -> set[str]:
    names = {v.name for v in graph.input} | {init.name for init in graph.initializer}
    return names | {name for node in graph.node for name in node.output if name}


def drop_unread_nodes(graph: onnx.GraphProto) -> None:
    """Remove nodes none of whose outputs is read or a graph output (the fixed Ifs' conditions)."""
    outputs = {value.name for value in graph.output}
    while True:
        read = outputs | {name for node in graph.node for name in node_reads(node)}
        kept = [node for node in graph.node if any(name in read for name in node.output if name)]
        if len(kept) == len(graph.node):
            return
        del graph.node[:]
        graph.node.extend(kept)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy

"""What a model's output is: class scores, embeddings, per-step class scores, or a dense map.

One mechanism for the two places that must fit a model's task: the calibration loss
(``sensitivity.losses``: which self-distillation loss) and the evaluation metric
(``planner.evaluate``: which agreement or similarity). The rules read the op that produced the
output (looking through reshapes, transposes and casts) and the float model's output values:

- produced by Softmax / LogSoftmax / Sigmoid with more than one column: class scores (rank 2) or a
  sequence (rank 3) of probabilities, log-probabilities or independent (binary) probabilities;
- values whose last axis is a probability distribution (in [0, 1], summing to 1) or its log
  (log-sum-exp 0): probabilities or log-probabilities, whatever op made them;
- rows of unit L2 norm, or a final LpNormalization / Div by a norm (F.normalize): embeddings;
- one value per sample: dense (the argmax of one value is always 0);
- any other rank-2 output: class scores as logits; rank 3 from a classifier head (MatMul, Gemm,
  Add): a sequence of logits; anything else: a dense map.

The producing op comes from the ONNX graph (``OnnxProgram.normalization``) or from the FX graph of
a ``torch.export`` archive (aten ops named as their ONNX counterparts); a plain ``nn.Module``
program has no graph, and only the values speak. Torch is imported only to read an FX graph: the
rules themselves run without it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx

if TYPE_CHECKING:
    import torch

    from sensitivity.program import Program

OUTPUT_KINDS = ("class_scores", "embeddings", "sequence", "dense")
# What class scores hold: logits, a distribution over the last axis (Softmax), its log
# (LogSoftmax), or one independent probability per class (Sigmoid).
SCORE_FORMS = ("logits", "probabilities", "log_probabilities", "binary_probabilities")

# Ops that only move or relabel values: the op that computed an output is found through them.
_PASS_THROUGH = {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Cast"}
_SCORE_FORM = {"Softmax": "probabilities", "LogSoftmax": "log_probabilities", "Sigmoid": "binary_probabilities"}
_NORM_OPS = {"ReduceL2", "LpNormalization", "Sqrt"}
# A sequence's class scores come out of a classifier head (or its softmax); a rank-3 output from
# anything else (Concat of a detector's boxes and scores, a LayerNormalization of token states)
# has no per-step class axis to take the argmax of.
_HEAD_OPS = set(_SCORE_FORM) | {"MatMul", "Gemm", "Add"}
# Float rows within this of unit L2 norm are embeddings: float32 normalisation is exact to ~1e-7.
UNIT_NORM_TOLERANCE = 1e-3
# Rows within this of summing to 1 (probabilities; log-sum-exp 0 for log-probabilities): float32
# softmax over thousands of classes sums to 1 within ~1e-5.
PROBABILITY_TOLERANCE = 1e-3
# The value rules read at most this many samples: a few hundred rows witness "every row" as well as
# thousands do, and the copy stays small for [N, 40, 6625] recogniser outputs.
KIND_SAMPLES = 256

# aten op (the name between "aten." and the overload) -> the ONNX op type it computes, for the rules.
_ATEN_OPS = {
    "softmax": "Softmax",
    "_softmax": "Softmax",
    "log_softmax": "LogSoftmax",
    "_log_softmax": "LogSoftmax",
    "sigmoid": "Sigmoid",
    "linear": "Gemm",
    "addmm": "Gemm",
    "mm": "MatMul",
    "matmul": "MatMul",
    "bmm": "MatMul",
    "add": "Add",
    "div": "Div",
    "linalg_vector_norm": "ReduceL2",
    "norm": "ReduceL2",
    "sqrt": "Sqrt",
    "clamp_min": "Clip",
    "clamp": "Clip",
    "expand_as": "Expand",
    "expand": "Expand",
    "view": "Reshape",
    "_unsafe_view": "Reshape",
    "reshape": "Reshape",
    "flatten": "Flatten",
    "squeeze": "Squeeze",
    "unsqueeze": "Unsqueeze",
    "permute": "Transpose",
    "transpose": "Transpose",
    "t": "Transpose",
    "_to_copy": "Cast",
    "to": "Cast",
    "clone": "Identity",
    "contiguous": "Identity",
    "alias": "Identity",
    "detach": "Identity",
}

# tensor name -> (op type that produced it, its input tensor names): the little the rules need of a graph
Producers = Mapping[str, tuple[str, tuple[str, ...]]]


@dataclass(frozen=True)
class OutputKind:
    kind: str  # one of OUTPUT_KINDS
    form: str  # one of SCORE_FORMS for class_scores and sequence; "" for embeddings and dense
    reason: str  # the rule that said so, for reports


def output_kind(values: np.ndarray, producers: Producers | None = None, name: str = "") -> OutputKind:
    """The kind of output ``name`` whose float values (``[samples, ...]``) are ``values``;
    ``producers`` is its graph (``onnx_producers``, ``fx_producers``), None when there is none."""
    rank, width = values.ndim, values.shape[-1] if values.ndim > 1 else 1
    op = producing_op(producers, name) if producers is not None else None
    sequence = {2: "class_scores", 3: "sequence"}.get(rank, "dense")
    if op in _SCORE_FORM and width > 1:
        form = _SCORE_FORM[op] if sequence != "dense" else ""
        return OutputKind(sequence, form, f"the output is rank {rank} from {op}: {sequence.replace('_', ' ')}")
    if width > 1 and sequence != "dense":
        values = values[:KIND_SAMPLES]
        if _probability_rows(values):
            return OutputKind(
                sequence,
                "probabilities",
                f"the float model's {width}-wide rows of the output are "
                f"probabilities (in [0, 1], summing to 1): {sequence.replace('_', ' ')}",
            )
        if _log_probability_rows(values):
            return OutputKind(
                sequence,
                "log_probabilities",
                f"the float model's {width}-wide rows of the output "
                f"are log-probabilities (log-sum-exp 0): {sequence.replace('_', ' ')}",
            )
    if width > 1 and _unit_rows(values[:KIND_SAMPLES]):
        return OutputKind("embeddings", "", f"the float model's {width}-wide rows of the output have unit L2 norm")
    divides_by_norm = op == "Div" and producers is not None and _divides_by_norm(producers, name)
    if op == "LpNormalization" or divides_by_norm:
        return OutputKind("embeddings", "", f"the output is L2-normalised ({op})")
    if width == 1:
        # One value per sample: its argmax is always 0, so agreement would be 100 % whatever the model does.
        return OutputKind("dense", "", "the output has one value per sample: compared by cosine over the samples")
    source = f"from {op}" if op is not None else "(no graph: values only)"
    if rank == 2:
        return OutputKind("class_scores", "logits", f"the output is rank 2 [samples, {width}] {source}: class scores")
    if rank == 3 and op in _HEAD_OPS:
        return OutputKind(
            "sequence", "logits", f"the output is rank 3 [samples, steps, {width}] {source}: per-step class scores"
        )
    return OutputKind("dense", "", f"the output is rank {rank} {source}: a dense map")


def detect_kind(model: onnx.ModelProto, first_output: np.ndarray) -> tuple[str, str]:
    """What an ONNX model's first output is (one of ``OUTPUT_KINDS``), and the rule that said so.

    ``first_output`` holds the float model's values, ``[samples, ...]`` in the output's shape."""
    found = output_kind(first_output, onnx_producers(model), model.graph.output[0].name)
    return found.kind, found.reason.replace("the output", "the first output", 1)


def program_output_kind(program: Program, index: int, values: np.ndarray) -> OutputKind:
    """The kind of a ``sensitivity.program.Program``'s output ``index``, from its float ``values``
    and the graph it came from: the normalised ONNX model of an ``OnnxProgram``, the FX graph of a
    loaded ``torch.export`` archive; a plain ``nn.Module`` has none (values only)."""
    normalized = getattr(program, "normalization", None)
    if normalized is not None:
        return output_kind(values, onnx_producers(normalized.model), normalized.model.graph.output[index].name)
    module = getattr(program, "module", None)
    if module is not None and _is_graph_module(module):  # a module means torch is loaded already
        producers, outputs = fx_producers(module.graph)
        if index < len(outputs):
            return output_kind(values, producers, outputs[index])
    return output_kind(values)


def _is_graph_module(module: object) -> bool:
    import torch.fx

    return isinstance(module, torch.fx.GraphModule)


def onnx_producers(model: onnx.ModelProto) -> Producers:
    return {output: (node.op_type, tuple(node.input)) for node in model.graph.node for output in node.output}


def fx_producers(graph: torch.fx.Graph) -> tuple[Producers, tuple[str, ...]]:
    """The producers of an FX graph's values, aten ops named as ONNX ops (others keep their aten
    name), and the graph's output value names (an output that is not a node's value is "")."""
    import torch.fx

    producers = {}
    outputs: tuple[str, ...] = ()
    for node in graph.nodes:
        if node.op == "call_function":
            aten = str(node.target)
            op = _ATEN_OPS.get(aten.split(".")[1], aten) if aten.startswith("aten.") else aten
            producers[node.name] = (op, tuple(arg.name for arg in node.args if isinstance(arg, torch.fx.Node)))
        elif node.op == "output":
            values = node.args[0] if isinstance(node.args[0], (tuple, list)) else (node.args[0],)
            outputs = tuple(value.name if isinstance(value, torch.fx.Node) else "" for value in values)
    return producers, outputs


def producing_op(producers: Producers | onnx.ModelProto, name: str) -> str:
    """The op type that computed tensor ``name``, looking through reshapes, transposes and casts;
    "input" when no node did (a graph input or a constant)."""
    if isinstance(producers, onnx.ModelProto):
        producers = onnx_producers(producers)
    found = producers.get(name)
    for _ in range(len(producers)):
        if found is None or found[0] not in _PASS_THROUGH or not found[1]:
            break
        found = producers.get(found[1][0])
    return "input" if found is None else found[0]


def _divides_by_norm(producers: Producers, name: str) -> bool:
    """Whether ``name`` is x / f(‖x‖₂): the divisor's producers (a few steps back) include a norm.
    torch's F.normalize exports as Div(x, Expand(Clip(ReduceL2(x))))."""
    divisor = producers[name][1][1:2] if name in producers else ()
    frontier = list(divisor)
    for _ in range(4):
        found = [producers[t] for t in frontier if t in producers]
        if any(op in _NORM_OPS for op, _ in found):
            return True
        frontier = [t for _, inputs in found for t in inputs]
    return False


def _unit_rows(values: np.ndarray) -> bool:
    norms = np.linalg.norm(values.reshape(-1, values.shape[-1]), axis=1)
    return bool(len(norms)) and bool(np.all(np.abs(norms - 1.0) < UNIT_NORM_TOLERANCE))


def _probability_rows(values: np.ndarray) -> bool:
    rows = values.reshape(-1, values.shape[-1])
    if not len(rows) or rows.min() < 0.0 or rows.max() > 1.0:
        return False
    return bool(np.all(np.abs(rows.sum(axis=1, dtype=np.float64) - 1.0) < PROBABILITY_TOLERANCE))


def _log_probability_rows(values: np.ndarray) -> bool:
    rows = values.reshape(-1, values.shape[-1]).astype(np.float64)
    if not len(rows) or rows.max() > PROBABILITY_TOLERANCE or not np.all(np.isfinite(rows)):
        return False
    top = rows.max(axis=1, keepdims=True)
    log_sum = top[:, 0] + np.log(np.exp(rows - top).sum(axis=1))
    return bool(np.all(np.abs(log_sum) < PROBABILITY_TOLERANCE))

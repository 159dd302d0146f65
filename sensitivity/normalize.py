"""The one normalisation step every part of mpq runs first: ``normalize_model(model) -> NormalizedModel``.

Real exporters write the same graph in ways the rest of mpq would read differently; after this step
inspection, sensitivity, planning and export see one model, so a layer has one name everywhere
(DESIGN.md: layer). In order:

1. refuse an already-quantized model (``AlreadyQuantizedError``): mpq plans the quantization of a
   float model, and integer ops (ConvInteger, QLinearConv, MatMulNBits, Q/DQ on weights, ...) would
   otherwise be reported as "unsupported ops";
2. ``If`` nodes whose condition is the same on every calibration batch are replaced by the branch
   taken (``sensitivity.branches``: silero-vad keeps its whole network, weights included, inside
   an ``If`` on the sample rate), checked against the original in onnxruntime;
3. large ``Constant`` nodes become initializers under their output names (``PROMOTE_MIN_ELEMENTS``):
   paddle2onnx stores every weight that way, so ``find_layers`` found no layer in PP-OCR models;
   then a layer op's weight computed from constants by data-movement ops alone (torch's LSTM gate
   reordering, left unfolded in silero-vad) becomes one initializer (``sensitivity.fold``);
   an inference BatchNormalization after a Conv, ConvTranspose or Gemm is folded into that layer's
   weight and bias, as torch's exporters write it (``sensitivity.batchnorm``: paddle2onnx leaves
   them), checked against the original in onnxruntime like an upgrade;
4. graph input/output dims written as ``dim_value <= 0`` (paddle2onnx, tf2onnx write -1) become
   dynamic, like ``dim_param`` and missing dims (``static_dims`` is the one reading of a dim);
5. the default-domain opset is upgraded to what the caller needs (the interpreter's floor,
   ``MIN_OPSET``, or the exporter's opset for the candidates) with ``onnx.version_converter``, and
   the upgraded model is checked against the original in onnxruntime on the first
   ``UPGRADE_CHECK_SAMPLES`` samples the caller gives, with a relative tolerance.

The given proto is never modified; a model that needs no change is returned as it is (no copy).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from sensitivity.batchnorm import fold_batchnorms, has_foldable_batchnorm
from sensitivity.branches import (
    CONDITION_BATCH,
    DEFAULT_DOMAINS,
    FixedBranch,
    fix_branches,
)
from sensitivity.fold import fold_weights, foldable_weights

logger = logging.getLogger(__name__)

MIN_OPSET = 11  # the oldest default-domain opset the interpreter (sensitivity.onnx_program) reads
# Constant tensors with >= 2 dims (every weight: find_layers needs >= 2) or >= 8 elements (biases and
# norm vectors, which onnxruntime's quantizer only quantizes as initializers) become initializers.
# Scalars and short vectors (shapes, axes, Clip bounds) stay nodes: shape arguments, not data. In the
# PP-OCR exports this promotes 126 / 122 / 211 of 342 / 420 / 308 Constants (det / rec / cls); the
# kept ones hold at most 6 elements, the smallest promoted vector 8 (a 8-channel bias in cls).
PROMOTE_MIN_ELEMENTS = 8
# The upgraded model must compute the original's outputs: max |a - b| <= RTOL * max |a| + ATOL per
# output. Relative because float32 rounding scales with the values: MiniLM's upgrade differed by
# 1.87e-5 on outputs up to 5.74 (3.3e-6 relative), which an absolute 1e-5 refused. 1e-4 is 30x that
# figure; a wrong conversion (a weight off by 1e-3, a changed axis) differs by 1e-2 relative or more.
UPGRADE_RTOL = 1e-4
UPGRADE_ATOL = 1e-6  # for outputs that are all (near) zero
# Samples both models run for the check: a conversion error shows on any input, and 8 samples keep
# the check well under the cost of one sensitivity pass.
UPGRADE_CHECK_SAMPLES = 8
# Samples whose If conditions are read before a branch is fixed (in batches of CONDITION_BATCH, and
# the first alone): one forward pass of the float model on a few batches, a condition that depends
# on the values rather than the shapes shows a second value on some of them.
BRANCH_CONDITION_SAMPLES = 64

# Ops that only occur in quantized graphs (onnxruntime's quantizers, TensorRT/QAT exports).
QUANTIZED_OPS = frozenset(
    {
        "ConvInteger",
        "MatMulInteger",
        "DynamicQuantizeLinear",
        "QLinearConv",
        "QLinearMatMul",
        "QGemm",
        "QAttention",
        "QEmbedLayerNormalization",
        "DynamicQuantizeLSTM",
        "DynamicQuantizeMatMul",
        "MatMulIntegerToFloat",
        "MatMulNBits",
        "MatMulBnb4",
        "GatherBlockQuantized",
    }
)
_QUANTIZED_PREFIXES = ("QLinear", "QOrdered")
_WEIGHT_QUANTIZERS = ("QuantizeLinear", "DequantizeLinear")  # quantized when their input is a constant


class AlreadyQuantizedError(ValueError):
    """The model is already quantized; mpq quantizes float models."""


class OpsetUpgradeError(ValueError):
    """The opset upgrade failed, or the upgraded model computes other outputs than the original."""


class BatchNormFoldError(ValueError):
    """The model with BatchNormalization folded into the layers before it computes other outputs."""


class BranchFixError(ValueError):
    """The model with If nodes replaced by their taken branches computes other outputs."""


@dataclass(frozen=True)
class UpgradeCheck:
    """How a changed model (upgraded, or with fixed branches) compared with the original in
    onnxruntime (the worst output)."""

    samples: int
    max_abs_difference: float
    max_relative_difference: float  # max |a - b| / max |a| of the worst output
    rtol: float = UPGRADE_RTOL

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "max_abs_difference": self.max_abs_difference,
            "max_relative_difference": self.max_relative_difference,
            "rtol": self.rtol,
        }


@dataclass(frozen=True)
class NormalizedModel:
    """The normalised model and what normalisation changed (for reports: ``changes``, ``to_dict``).

    ``upgrade_check`` is None when the opset was not upgraded, or when no samples were given to
    check it; ``batchnorm_check`` likewise for folded BatchNorms. ``fixed_branches`` needs samples:
    without them no If is fixed. ``folded_batchnorms`` names the weight (the layer) each BN went into.
    """

    model: onnx.ModelProto = field(repr=False)
    promoted_constants: tuple[str, ...] = ()
    dynamic_dims: tuple[str, ...] = ()  # "x[0]" for each dim written as a non-positive number
    source_opset: int = 0
    opset: int = 0
    upgrade_check: UpgradeCheck | None = None
    fixed_branches: tuple[FixedBranch, ...] = ()
    branch_check: UpgradeCheck | None = None
    folded_weights: tuple[str, ...] = ()
    folded_batchnorms: tuple[str, ...] = ()
    batchnorm_check: UpgradeCheck | None = None
    folded_into: tuple[str, ...] = ()  # the ops the BNs were folded into (Conv, ConvTranspose, Gemm)

    @property
    def upgraded(self) -> bool:
        return self.opset != self.source_opset

    @property
    def changed(self) -> bool:
        return bool(
            self.promoted_constants
            or self.dynamic_dims
            or self.upgraded
            or self.fixed_branches
            or self.folded_weights
            or self.folded_batchnorms
        )

    def changes(self) -> list[str]:
        """One sentence per change, for logs and reports."""
        lines = [fixed.describe() for fixed in self.fixed_branches]
        if self.fixed_branches and self.branch_check is not None:
            lines.append(
                f"the model with fixed branches checked on {self.branch_check.samples} samples: "
                f"max relative difference {self.branch_check.max_relative_difference:.3g}"
            )
        if self.promoted_constants:
            lines.append(f"{len(self.promoted_constants)} Constant nodes became initializers")
        if self.folded_weights:
            lines.append(
                f"{len(self.folded_weights)} weights computed from constants by data-movement ops were "
                f"folded into initializers: {', '.join(self.folded_weights)}"
            )
        if self.folded_batchnorms:
            lines.append(self._describe_batchnorms())
        if self.dynamic_dims:
            lines.append(f"dims written as non-positive numbers are dynamic: {', '.join(self.dynamic_dims)}")
        if self.upgraded:
            check = self.upgrade_check
            how = (
                "not checked (no samples given)"
                if check is None
                else f"checked on {check.samples} samples: max relative difference {check.max_relative_difference:.3g}"
            )
            lines.append(f"opset upgraded from {self.source_opset} to {self.opset}, {how}")
        return lines

    def _describe_batchnorms(self) -> str:
        check = self.batchnorm_check
        how = (
            "not checked (no samples given)"
            if check is None
            else f"checked on {check.samples} samples: max relative difference {check.max_relative_difference:.3g}"
        )
        return (
            f"folded {len(self.folded_batchnorms)} BatchNormalization nodes into the {'/'.join(self.folded_into)} "
            f"before them: {', '.join(self.folded_batchnorms)}; {how}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "promoted_constants": len(self.promoted_constants),
            "dynamic_dims": list(self.dynamic_dims),
            "source_opset": self.source_opset,
            "opset": self.opset,
            "upgrade_check": None if self.upgrade_check is None else self.upgrade_check.to_dict(),
            "fixed_branches": [fixed.describe() for fixed in self.fixed_branches],
            "folded_weights": list(self.folded_weights),
            "folded_batchnorms": list(self.folded_batchnorms),
            "batchnorm_check": None if self.batchnorm_check is None else self.batchnorm_check.to_dict(),
            "branch_check": None if self.branch_check is None else self.branch_check.to_dict(),
            "changes": self.changes(),
        }


def normalize_model(
    model: onnx.ModelProto | NormalizedModel,
    *,
    opset: int = MIN_OPSET,
    samples: Mapping[str, np.ndarray] | None = None,
    sample_axes: Mapping[str, int | None] | None = None,
) -> NormalizedModel:
    """Normalise ``model`` (see the module doc) to at least ``opset``.

    ``samples`` maps the graph inputs (other keys, e.g. ``labels``, are ignored) to arrays with
    samples on their sample axes (``sensitivity.samples``; ``sample_axes`` overrides the declared
    ones); the first ``UPGRADE_CHECK_SAMPLES`` check an opset upgrade. Without
    them an upgrade is applied unchecked (logged): give them wherever expensive work follows.
    An already normalised model is returned as is when its opset suffices. Raises
    ``AlreadyQuantizedError``, ``BranchFixError``, ``BatchNormFoldError`` and ``OpsetUpgradeError`` (all ValueErrors)
    with what is wrong.
    """
    if isinstance(model, NormalizedModel):
        return model if model.opset >= opset else _upgraded_further(model, opset, samples, sample_axes)
    refuse_quantized(model)
    source_opset = default_opset(model)
    fixed_model, fixed = fix_branches(model, _condition_batches(model, samples, sample_axes))
    branch_check = _check_branches(model, fixed_model, samples, sample_axes) if fixed and samples is not None else None
    promote = _constants_to_promote(fixed_model)
    dynamic = _non_positive_dims(fixed_model)
    foldable = foldable_weights(fixed_model)  # chains may end in Constant nodes: promotion keeps them foldable
    batchnorms = has_foldable_batchnorm(fixed_model, set(promote))
    if not fixed and not promote and not dynamic and not foldable and not batchnorms and source_opset >= opset:
        return NormalizedModel(model, source_opset=source_opset, opset=source_opset)
    working = fixed_model if fixed else _copy(model)
    _promote_constants(working, promote)
    folded = fold_weights(working, foldable)
    folded_batchnorms = fold_batchnorms(working)
    batchnorm_check = _check_batchnorms(fixed_model, working, folded_batchnorms, samples, sample_axes)
    _clear_non_positive_dims(working)
    working, check = _upgrade(fixed_model, working, source_opset, opset, samples, sample_axes)
    return NormalizedModel(
        working,
        tuple(promote),
        tuple(dynamic),
        source_opset,
        default_opset(working),
        check,
        fixed,
        branch_check,
        tuple(folded),
        tuple(weight for _, weight in folded_batchnorms),
        batchnorm_check,
        tuple(dict.fromkeys(op for op, _ in folded_batchnorms)),
    )


def _upgraded_further(
    normalized: NormalizedModel,
    opset: int,
    samples: Mapping[str, np.ndarray] | None,
    sample_axes: Mapping[str, int | None] | None = None,
) -> NormalizedModel:
    again = normalize_model(normalized.model, opset=opset, samples=samples, sample_axes=sample_axes)
    # an earlier unchecked upgrade stays unchecked: the original it should be compared with is gone
    earlier_unchecked = normalized.upgraded and normalized.upgrade_check is None
    return NormalizedModel(
        again.model,
        normalized.promoted_constants,
        normalized.dynamic_dims,
        normalized.source_opset,
        again.opset,
        None if earlier_unchecked else again.upgrade_check,
        normalized.fixed_branches,
        normalized.branch_check,
        normalized.folded_weights,
        normalized.folded_batchnorms,
        normalized.batchnorm_check,
        normalized.folded_into,
    )


# --- reading dims and opsets ------------------------------------------------------------------


def static_dims(value: onnx.ValueInfoProto) -> list[int | None] | None:
    """A value's dims, None for each dynamic one (symbolic, missing, or written as <= 0);
    None when the value has no tensor shape at all. The one reading every shape check uses."""
    tensor = value.type.tensor_type
    if not value.type.HasField("tensor_type") or not tensor.HasField("shape"):
        return None
    return [int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else None for d in tensor.shape.dim]


def fixed_batch_size(model: onnx.ModelProto, sample_axes: Mapping[str, int | None] | None = None) -> int | None:
    """N when every per-sample graph input's dim on its sample axis is the same fixed N (a model
    exported with batch 1, or any N; ``sensitivity.samples``), else None. Such a model runs on chunks
    of exactly N samples; a calibration set of any size is cut into them (the last one padded),
    never by editing the model's batch dim."""
    # sensitivity.samples reads dims through this module, so it is imported here
    from sensitivity.samples import fixed_batch

    return fixed_batch(model, sample_axes)


def common_fixed_dim(first_dims: Sequence[int | str | None]) -> int | None:
    """The one fixed size all inputs' first dims share, else None (symbolic, missing, <= 0 or mixed
    dims: e.g. a state input of fixed size 2 beside a dynamic batch is no fixed batch)."""
    sizes = {dim if isinstance(dim, int) and dim > 0 else None for dim in first_dims}
    return sizes.pop() if len(sizes) == 1 and None not in sizes else None


def padded_rows(start: int, stop: int, fixed: int | None) -> slice | np.ndarray:
    """The sample indices of one batch: ``start:stop``, padded to ``fixed`` rows by repeating its
    first sample when the model only takes batches of exactly that size."""
    if fixed is None or stop - start == fixed:
        return slice(start, stop)
    return np.concatenate([np.arange(start, stop), np.full(fixed - (stop - start), start)])


def default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in DEFAULT_DOMAINS:
            return int(entry.version)
    raise ValueError("the model imports no version of the default ONNX domain")


# --- 1. already quantized ---------------------------------------------------------------------


def refuse_quantized(model: onnx.ModelProto) -> None:
    """Raise ``AlreadyQuantizedError`` naming the quantized ops (count and first node of each)."""
    constants = {init.name for init in model.graph.initializer}
    constants |= {out for node in model.graph.node if node.op_type == "Constant" for out in node.output}
    found: dict[str, list[str]] = {}
    for index, node in enumerate(model.graph.node):
        label = _quantized_label(node, constants)
        if label is not None:
            found.setdefault(label, []).append(node.name or f"{node.op_type}_{index}")
    if found:
        listing = ", ".join(f"{label} ({len(nodes)} nodes, e.g. {nodes[0]!r})" for label, nodes in found.items())
        raise AlreadyQuantizedError(
            f"the model is already quantized: it uses {listing}. mpq plans the quantization of a float "
            "model; give it the float model this one was quantized from"
        )


def _quantized_label(node: onnx.NodeProto, constants: set[str]) -> str | None:
    label = f"{node.domain}::{node.op_type}" if node.domain not in DEFAULT_DOMAINS else node.op_type
    if node.op_type in QUANTIZED_OPS or node.op_type.startswith(_QUANTIZED_PREFIXES):
        return label
    if node.op_type in _WEIGHT_QUANTIZERS and node.input and node.input[0] in constants:
        return f"{label} on a weight"
    return None


# --- 2. Constant nodes to initializers --------------------------------------------------------


def _constants_to_promote(model: onnx.ModelProto) -> list[str]:
    """Output names of the Constant nodes holding a tensor large enough to be data, not a shape."""
    graph_outputs = {value.name for value in model.graph.output}
    names = []
    for node in model.graph.node:
        tensor = _constant_tensor(node)
        if tensor is None or node.output[0] in graph_outputs:
            continue  # an initializer that is also a graph output is left as the exporter wrote it
        if len(tensor.dims) >= 2 or _num_elements(tensor) >= PROMOTE_MIN_ELEMENTS:
            names.append(node.output[0])
    return names


def _constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    if node.op_type != "Constant" or node.domain not in DEFAULT_DOMAINS or len(node.output) != 1:
        return None
    return next((attr.t for attr in node.attribute if attr.name == "value" and attr.HasField("t")), None)


def _num_elements(tensor: onnx.TensorProto) -> int:
    count = 1
    for dim in tensor.dims:
        count *= int(dim)
    return count


def _promote_constants(model: onnx.ModelProto, names: Sequence[str]) -> None:
    """Move each named Constant's tensor into an initializer of the same name; drop the nodes."""
    if not names:
        return
    wanted = set(names)
    kept = []
    for node in model.graph.node:
        tensor = _constant_tensor(node) if node.output and node.output[0] in wanted else None
        if tensor is not None:  # the names are those of Constants with a tensor (_constants_to_promote)
            initializer = model.graph.initializer.add()
            initializer.CopyFrom(tensor)
            initializer.name = node.output[0]
            tensor.Clear()  # the node is dropped: free its copy now, so the peak is one tensor, not all
        else:
            kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    model.ir_version = max(model.ir_version, 4)  # before IR 4 every initializer also had to be a graph input


# --- 3. non-positive dims ---------------------------------------------------------------------


def _shaped_values(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    return [*model.graph.input, *model.graph.output, *model.graph.value_info]


def _non_positive_dims(model: onnx.ModelProto) -> list[str]:
    found = []
    for value in _shaped_values(model):
        if value.type.HasField("tensor_type"):
            for axis, dim in enumerate(value.type.tensor_type.shape.dim):
                if dim.HasField("dim_value") and dim.dim_value <= 0:
                    found.append(f"{value.name}[{axis}]")
    return found


def _clear_non_positive_dims(model: onnx.ModelProto) -> None:
    """A dim written as -1 (or 0) becomes a dim with no value: dynamic for onnx and onnxruntime."""
    for value in _shaped_values(model):
        if value.type.HasField("tensor_type"):
            for dim in value.type.tensor_type.shape.dim:
                if dim.HasField("dim_value") and dim.dim_value <= 0:
                    dim.ClearField("dim_value")


# --- 4. opset upgrade and its check -----------------------------------------------------------


def _upgrade(
    original: onnx.ModelProto,
    working: onnx.ModelProto,
    current: int,
    target: int,
    samples: Mapping[str, np.ndarray] | None,
    sample_axes: Mapping[str, int | None] | None = None,
) -> tuple[onnx.ModelProto, UpgradeCheck | None]:
    if current >= target:
        return working, None
    try:
        upgraded = onnx.version_converter.convert_version(working, target)
    except Exception as error:
        raise OpsetUpgradeError(f"could not upgrade the model from opset {current} to {target}: {error}") from None
    # the converter keeps the source IR version; the new opset may need a newer one (21 needs IR 10)
    upgraded.ir_version = max(
        upgraded.ir_version, onnx.helper.find_min_ir_version_for(list(upgraded.opset_import), ignore_unknown=True)
    )
    if samples is None:
        logger.info("opset upgraded from %d to %d without a check: no samples given", current, target)
        return upgraded, None
    return upgraded, check_upgrade(original, upgraded, samples, (current, target), sample_axes)


def check_upgrade(
    original: onnx.ModelProto,
    upgraded: onnx.ModelProto,
    samples: Mapping[str, np.ndarray],
    opsets: tuple[int, int],
    sample_axes: Mapping[str, int | None] | None = None,
) -> UpgradeCheck:
    """Run both models in onnxruntime on the first samples; ``OpsetUpgradeError`` when they differ."""
    batch = sample_batch(original, samples, 0, UPGRADE_CHECK_SAMPLES, sample_axes)
    what = f"the model upgraded from opset {opsets[0]} to {opsets[1]}"
    return _compare(original, upgraded, [batch], what, OpsetUpgradeError, sample_axes)


def _check_batchnorms(
    original: onnx.ModelProto,
    folded: onnx.ModelProto,
    folds: Sequence[tuple[str, str]],
    samples: Mapping[str, np.ndarray] | None,
    sample_axes: Mapping[str, int | None] | None,
) -> UpgradeCheck | None:
    """The model with folded BatchNorms against the original on the first samples (the fold is
    exact up to float rounding: W * s is rounded once instead of each output being scaled);
    ``BatchNormFoldError`` when they differ. None when nothing was folded or no samples given."""
    if not folds:
        return None
    if samples is None:
        logger.info("%d BatchNormalization nodes folded without a check: no samples given", len(folds))
        return None
    batch = sample_batch(original, samples, 0, UPGRADE_CHECK_SAMPLES, sample_axes)
    what = "the model with BatchNormalization folded into the layers before it"
    return _compare(original, folded, [batch], what, BatchNormFoldError, sample_axes)


def _check_branches(
    original: onnx.ModelProto,
    fixed: onnx.ModelProto,
    samples: Mapping[str, np.ndarray],
    sample_axes: Mapping[str, int | None] | None,
) -> UpgradeCheck:
    """The model with fixed branches against the original, on the first samples and (dynamic
    batch) the first sample alone; ``BranchFixError`` when they differ."""
    batches = [sample_batch(original, samples, 0, UPGRADE_CHECK_SAMPLES, sample_axes)]
    if fixed_batch_size(original, sample_axes) is None and _count(original, samples, sample_axes) > 1:
        batches.append(sample_batch(original, samples, 0, 1, sample_axes))
    return _compare(
        original,
        fixed,
        batches,
        "the model with If nodes replaced by their taken branches",
        BranchFixError,
        sample_axes,
    )


def _compare(
    original: onnx.ModelProto,
    changed: onnx.ModelProto,
    batches: Sequence[Mapping[str, np.ndarray]],
    what: str,
    error: type[ValueError],
    sample_axes: Mapping[str, int | None] | None,
) -> UpgradeCheck:
    worst_abs, worst_rel = 0.0, 0.0
    for feeds in batches:
        before = run_model(original, feeds, "the model", error)
        after = run_model(changed, feeds, what, error)
        batch_abs, batch_rel = compare_outputs(before, after, what, error, UPGRADE_RTOL, UPGRADE_ATOL)
        worst_abs, worst_rel = max(worst_abs, batch_abs), max(worst_rel, batch_rel)
    return UpgradeCheck(_count(original, batches[0], sample_axes) if batches[0] else 0, worst_abs, worst_rel)


def compare_outputs(
    reference: Sequence[np.ndarray],
    actual: Sequence[np.ndarray],
    what: str,
    error: type[ValueError],
    rtol: float,
    atol: float,
) -> tuple[float, float]:
    """(max |difference|, max relative difference) of ``actual`` against ``reference``, output by output;
    ``error`` naming ``what`` and the output when one differs by more than ``rtol`` of its values' scale
    plus ``atol`` (a changed model, or an export, that cannot be used)."""
    worst_abs, worst_rel = 0.0, 0.0
    for index, (a, b) in enumerate(zip(reference, actual, strict=True)):
        difference, scale = _difference(a, b)
        if difference > rtol * scale + atol:
            raise error(
                f"{what} computes different outputs (output {index}: max |difference| {difference:.3g} on "
                f"values up to {scale:.3g}, more than {rtol:g} relative); it cannot be used"
            )
        worst_abs = max(worst_abs, difference)
        worst_rel = max(worst_rel, difference / scale if scale else 0.0)
    return worst_abs, worst_rel


def _difference(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(max |a - b|, max |a|); an output whose shape changed differs infinitely."""
    if a.shape != b.shape:
        return float("inf"), 0.0
    if a.size == 0:
        return 0.0, 0.0
    if not np.issubdtype(a.dtype, np.floating):
        return (0.0 if np.array_equal(a, b) else float("inf")), 0.0
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return float(np.max(np.abs(a64 - b64))), float(np.max(np.abs(a64)))


def _condition_batches(
    model: onnx.ModelProto, samples: Mapping[str, np.ndarray] | None, sample_axes: Mapping[str, int | None] | None
) -> list[dict[str, np.ndarray]]:
    """The batches whose If conditions decide which branches are fixed (``sensitivity.branches``)."""
    if samples is None or not any(node.op_type == "If" for node in model.graph.node):
        return []
    fixed = fixed_batch_size(model, sample_axes)
    total = min(_count(model, samples, sample_axes), BRANCH_CONDITION_SAMPLES)
    size = fixed or CONDITION_BATCH
    batches = [sample_batch(model, samples, start, start + size, sample_axes) for start in range(0, total, size)]
    return batches + ([sample_batch(model, samples, 0, 1, sample_axes)] if fixed is None and total > 1 else [])


def _model_inputs(model: onnx.ModelProto, samples: Mapping[str, np.ndarray]) -> list[str]:
    initializers = {init.name for init in model.graph.initializer}
    names = [value.name for value in model.graph.input if value.name not in initializers]
    missing = [name for name in names if name not in samples]
    if missing:
        raise ValueError(f"the samples to check the normalised model lack the model inputs {missing}")
    return names


def _count(
    model: onnx.ModelProto, samples: Mapping[str, np.ndarray], sample_axes: Mapping[str, int | None] | None
) -> int:
    from sensitivity.samples import (  # samples imports this module
        input_sample_axes,
        sample_count,
    )

    feeds = {name: np.asarray(samples[name]) for name in _model_inputs(model, samples)}
    return sample_count(feeds, input_sample_axes(model, sample_axes)) if feeds else 0


def sample_batch(
    model: onnx.ModelProto,
    samples: Mapping[str, np.ndarray],
    start: int,
    stop: int,
    sample_axes: Mapping[str, int | None] | None,
) -> dict[str, np.ndarray]:
    """Samples ``start:stop`` (fewer when there are fewer) as one run's feeds, each input cut on its
    own sample axis (shared inputs whole); a model exported with batch N runs on exactly N samples."""
    from sensitivity.samples import input_sample_axes, take_samples

    feeds = {name: np.asarray(samples[name]) for name in _model_inputs(model, samples)}
    if not feeds:
        return {}
    fixed = fixed_batch_size(model, sample_axes)
    count = _count(model, samples, sample_axes)
    stop = min(start + fixed, count) if fixed else min(stop, count)
    return take_samples(feeds, padded_rows(start, stop, fixed), input_sample_axes(model, sample_axes))


def run_model(
    model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], what: str, error: type[ValueError] = OpsetUpgradeError
) -> list[np.ndarray]:
    """``model``'s outputs on ``feeds`` in onnxruntime, graph optimisations off; ``error`` naming ``what``
    when onnxruntime refuses the model or the feeds."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    # the check compares the graphs as written: fusions could round differently in each
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return session.run(None, dict(feeds))
    except Exception as failure:
        text = str(failure).strip()
        first_line = text.splitlines()[0] if text else type(failure).__name__
        raise error(f"{what} does not run in onnxruntime on the given samples: {first_line}") from None


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy

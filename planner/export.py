"""Export a configuration as a quantized ONNX model (QDQ format), run by onnxruntime.

How each candidate is written:

- ``w8a8``, ``w4a8``, ``w8a16``: onnxruntime's own ``quantize_static`` in QDQ format, restricted to the layer's
  nodes (``nodes_to_quantize``), per-channel symmetric weights, uint8 activations calibrated on the
  calibration set (MinMax by default; uint16 for ``w8a16``'s inputs and outputs, per-tensor
  ``TensorQuantOverrides``, opset 21). Per-tensor ``TensorQuantOverrides`` fix each weight's axis;
  for int8 onnxruntime computes the scales itself, and they equal Q_b's (tested). For int4 the
  overrides also carry Q_b's scales, because onnxruntime's own symmetric int4 uses the range [-8, 7]
  with scale 2·absmax/15, which gives other integers than Q_b's restricted range [-7, 7].
- ``w8``, ``w4`` (weight-only): a hand-written ``DequantizeLinear`` on the weight. ``quantize_static``
  always quantizes a layer's input activation together with its weight, and ``MatMulNBitsQuantizer``
  only covers MatMul, block-wise, with the [-8, 7] int4 range; neither can store Q_b's integers on a
  Conv/Gemm weight with a float activation. (onnxruntime's CPU optimizer fuses such a
  DequantizeLinear → MatMul into MatMulNBits, which computes with int8 activations: docs/export.md.)
- An embedding (a Gather from a float table) has integer indices for input, no activation to
  quantize: every quantized candidate stores its table as the weight-only ones do, one scale per
  row (so ``w8a8`` there is ``w8``; its ``ExportedLayer`` says ``activation_bits=None``).
- ``fp16``: the weight stored in float16 (Q_16, ``sensitivity.quantize.to_float16``) and the layer's
  nodes computing in float16 between Casts (``planner.float16``, written by hand: onnxruntime's
  float16 converter cannot convert some nodes and leave the rest float32; reasons there). No opset
  requirement beyond the model's own.
- ``fp32``: left untouched.

4-bit types need opset 21, per-channel DequantizeLinear opset 13: the model is normalised first
(``sensitivity.normalize``, the step every part runs), which upgrades an older opset with
``onnx.version_converter`` and checks the upgraded float model against the original in onnxruntime
before it is used. ``planner.plan`` normalises to ``required_opset`` of its candidates before the
sensitivity analysis, so the exporter's own normalisation then changes nothing. The plan
(configuration, constraints, versions) goes into ``metadata_props`` as JSON under ``mpq.plan``.
Every artifact passes ``onnx.checker.check_model`` and runs in onnxruntime on the calibration inputs
before it is returned.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)

from planner.batches import batches, session_fixed_batch
from planner.candidates import Candidate, Configuration, as_configuration, get_candidate
from planner.cost import cpu_session, graph_inputs, layer_nodes, runtime_tensors
from planner.float16 import convert_layers_to_float16, float16_weight_name, unique_name
from sensitivity.layers import Layer, find_layers, node_weight_index, weight_array, weight_index
from sensitivity.normalize import (
    BatchNormFoldError,
    NormalizedModel,
    OpsetUpgradeError,
    normalize_model,
    padded_rows,
    static_dims,
)
from sensitivity.quantize import QuantizedWeight, quantize_weight
from sensitivity.samples import (
    SampleAxes,
    fixed_batch,
    input_sample_axes,
    sample_count,
    show_dims,
    take_samples,
)
from sensitivity.versions import versions as package_versions

logger = logging.getLogger(__name__)

PLAN_METADATA_KEY = "mpq.plan"
PLAN_FORMAT = "mpq.plan/1"
OPSET_FOR_4BIT = 21  # first opset whose DequantizeLinear accepts int4
OPSET_FOR_PER_CHANNEL = 13  # first opset whose DequantizeLinear has ``axis``
CALIBRATION_METHODS = ("minmax", "entropy", "percentile", "distribution")
IGNORED_INPUT_KEYS = ("labels",)  # data-set arrays that are not model inputs
_INT_TYPES = {8: TensorProto.INT8, 4: TensorProto.INT4}


class ExportError(RuntimeError):
    """The exporter could not produce a valid, runnable artifact."""


@dataclass(frozen=True)
class ExportedLayer:
    name: str
    candidate: str
    node_names: tuple[str, ...]
    weight_input: int  # which input of its first node the weight is (an LSTM/GRU has W at 1, R at 2)
    weight_bits: int | None
    activation_bits: int | None
    method: str  # "float", "onnxruntime.quantize_static" or "weight_only_dequantize"


@dataclass(frozen=True)
class ExportedModel:
    model_bytes: bytes
    sha256: str
    opset: int
    layers: Mapping[str, ExportedLayer]
    plan: Mapping[str, Any]  # the JSON stored under ``mpq.plan`` in the model's metadata

    def load(self) -> onnx.ModelProto:
        return onnx.load_from_string(self.model_bytes)


# ---------------------------------------------------------------------------------------------
# Public entry point


def export_model(
    model: onnx.ModelProto | NormalizedModel,
    configuration: Configuration | Mapping[str, str],
    calibration: Mapping[str, np.ndarray],
    *,
    metadata: Mapping[str, str] | None = None,
    constraints: Mapping[str, Any] | None = None,
    calibrate_method: str = "minmax",
    calibration_batch_size: int = 64,
    sample_axes: SampleAxes | None = None,
) -> ExportedModel:
    """Quantize ``model`` as ``configuration`` says and return the checked artifact.

    ``model`` is normalised first (``sensitivity.normalize``) to the opset the configuration
    needs; a ``NormalizedModel`` at that opset is used as it is. ``calibration`` maps every model
    input to an array with samples on its sample axis (``sensitivity.samples``: axis 0 unless the
    declared shape or ``sample_axes`` says otherwise; a shared input is fed whole; a ``labels``
    array is ignored). ``metadata`` adds string key/value pairs to ``metadata_props``;
    ``constraints`` (the search budget, if any) is stored with the plan.
    """
    configuration = as_configuration(configuration)
    source = model.model if isinstance(model, NormalizedModel) else model
    feeds = check_inputs(source, calibration, what="calibration set", sample_axes=sample_axes)
    axes = input_sample_axes(source, sample_axes)
    _check_options(calibrate_method, calibration_batch_size, metadata)
    normalized = _normalized(model, required_opset(configuration.values()), feeds, axes)
    model = normalized.model
    layers = find_layers(model)
    configuration = configuration.validate(layers)

    working, preprocessing = _prepare(model, layers, configuration, feeds, axes)
    nodes = {name: [node.name for node in found] for name, found in layer_nodes(working, layers).items()}
    by_name = {layer.name: layer for layer in layers}
    static = [name for name, c in configuration.items() if _is_static(get_candidate(c), by_name[name])]
    weight_only = [name for name, c in configuration.items() if get_candidate(c).integer_weights and name not in static]
    fp16 = [name for name, c in configuration.items() if get_candidate(c).float16]
    if static:
        working = _quantize_static(
            working,
            [by_name[n] for n in static],
            configuration,
            nodes,
            feeds,
            axes,
            calibrate_method,
            calibration_batch_size,
        )
    for name in weight_only:
        bits = _weight_bits(configuration, name)
        _add_weight_only_dequantize(working, by_name[name], bits, _nodes_named(working, nodes[name]))
    if fp16:  # last: the Q/DQ nodes above stay float32
        try:
            convert_layers_to_float16(working, layers, nodes, fp16)
        except ValueError as error:
            raise ExportError(f"the fp16 layers cannot be written: {error}") from error
    _check_layers_quantized(working, configuration, nodes, by_name)
    _raise_ir_version(working)

    exported_layers = _exported_layers(configuration, nodes, by_name)
    plan = _plan(
        configuration,
        exported_layers,
        constraints,
        calibrate_method,
        sample_count(feeds, axes),
        normalized.source_opset,
        working,
    )
    plan["preprocessing"] = preprocessing
    plan["normalization"] = normalized.to_dict()
    _write_metadata(working, plan, metadata)
    model_bytes = _serialize(working)
    validate_artifact(model_bytes, feeds, batch_size=calibration_batch_size, sample_axes=axes)
    return ExportedModel(
        model_bytes=model_bytes,
        sha256=hashlib.sha256(model_bytes).hexdigest(),
        opset=model_opset(working),
        layers=MappingProxyType(exported_layers),
        plan=MappingProxyType(plan),
    )


# ---------------------------------------------------------------------------------------------
# Inputs


def check_inputs(
    model: onnx.ModelProto,
    arrays: Mapping[str, np.ndarray],
    *,
    what: str = "inputs",
    sample_axes: SampleAxes | None = None,
) -> dict[str, np.ndarray]:
    """Check that ``arrays`` feed exactly the model's inputs (name, dtype, rank, fixed dims, and the same
    number of samples on each per-sample input's sample axis; ``sensitivity.samples``, with the user's
    ``sample_axes`` merged over the declared shapes). A shared input (declared rank 0) takes one value.

    Returns the model-input arrays (``labels`` and other ignored keys dropped). Raises ValueError naming
    every mismatch.
    """
    if not isinstance(arrays, Mapping):
        raise ValueError(f"{what} must map input names to arrays, got {type(arrays).__name__}")
    inputs = graph_inputs(model)
    expected = [value.name for value in inputs]
    missing = [name for name in expected if name not in arrays]
    unknown = [name for name in arrays if name not in expected and name not in IGNORED_INPUT_KEYS]
    if missing or unknown:
        raise ValueError(f"{what} does not match the model inputs {expected}: missing {missing}, unknown {unknown}")
    axes = input_sample_axes(model, sample_axes)
    problems: list[str] = []
    any_count = fixed_batch(model, sample_axes) is not None  # then any number of samples: run in batches of N
    for value in inputs:
        problems += _input_problems(value, arrays[value.name], axes[value.name], any_count=any_count)
    if problems:
        raise ValueError(f"{what} does not match the model inputs: " + "; ".join(problems))
    feeds = {name: arrays[name] for name in expected}
    sample_count(feeds, axes, what=what)  # the per-sample inputs must agree
    return feeds


def _input_problems(value: onnx.ValueInfoProto, array: object, axis: int | None, any_count: bool = False) -> list[str]:
    """What is wrong with ``array`` as input ``value`` whose samples lie on ``axis`` (None: shared)."""
    name = value.name
    if not isinstance(array, np.ndarray):
        return [f"{name!r} is a {type(array).__name__}, not a numpy array"]
    tensor_type = value.type.tensor_type
    expected_dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
    problems = []
    if array.dtype != expected_dtype:
        problems.append(f"{name!r} has dtype {array.dtype}, the model expects {expected_dtype}")
    dims = static_dims(value)  # -1 (paddle2onnx, tf2onnx), symbolic and missing dims are all dynamic
    where = "shared by every sample" if axis is None else f"samples on axis {axis}"
    if dims is not None:
        if array.ndim != len(dims):
            problems.append(
                f"{name!r} has shape {array.shape}, the model expects rank {len(dims)} ({show_dims(dims)}, "
                f"{where})" + (": give one value for all samples" if axis is None and not dims else "")
            )
        else:
            fixed = [
                (k, size)
                for k, size in enumerate(dims)
                if size is not None and array.shape[k] != size and not (any_count and k == axis)
            ]
            if fixed:
                problems.append(f"{name!r} has shape {array.shape}, the model expects {show_dims(dims)} ({where})")
    if axis is not None and (array.ndim <= axis or array.shape[axis] == 0):
        problems.append(f"{name!r} has no samples on axis {axis} (shape {array.shape})")
    return problems


def _check_options(calibrate_method: str, batch_size: int, metadata: Mapping[str, str] | None) -> None:
    if calibrate_method.lower() not in CALIBRATION_METHODS:
        raise ValueError(f"unknown calibration method {calibrate_method!r}; valid: {', '.join(CALIBRATION_METHODS)}")
    if batch_size < 1:
        raise ValueError(f"calibration_batch_size must be positive, got {batch_size}")
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(f"metadata must map strings to strings, got {key!r}: {value!r}")
        if key == PLAN_METADATA_KEY:
            raise ValueError(f"metadata key {PLAN_METADATA_KEY!r} is reserved for the plan")


# ---------------------------------------------------------------------------------------------
# Preparing the float graph


def _prepare(
    model: onnx.ModelProto,
    layers: Sequence[Layer],
    configuration: Configuration,
    feeds: Mapping[str, np.ndarray],
    axes: SampleAxes,
) -> tuple[onnx.ModelProto, str]:
    """A copy of the float model ready for the quantizer: named nodes, the needed opset, typed tensors."""
    working = _copy(model)
    _name_unnamed_nodes(working)
    # one sample (shared inputs whole) runs the float model; a model that takes exactly N samples, N copies
    first = take_samples(feeds, padded_rows(0, 1, fixed_batch(working, axes)), axes)
    _check_float_model_runs(working, first)
    working, preprocessing = _preprocess(working, layers)
    _complete_value_types(working, first)
    return working, preprocessing


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _name_unnamed_nodes(model: onnx.ModelProto) -> None:
    """``nodes_to_quantize`` selects nodes by name, so every node needs a unique one.

    Unnamed nodes get ``{op_type}_{index}``, the same fallback ``find_layers`` reports.
    """
    taken = {node.name for node in model.graph.node if node.name}
    seen: set[str] = set()
    for index, node in enumerate(model.graph.node):
        if node.name and node.name not in seen:
            seen.add(node.name)
            continue
        base = node.name or f"{node.op_type}_{index}"
        name, suffix = base, 1
        while name in seen or (name != node.name and name in taken):
            name, suffix = f"{base}_{suffix}", suffix + 1
        node.name = name
        seen.add(name)


def _check_float_model_runs(model: onnx.ModelProto, sample: Mapping[str, np.ndarray]) -> None:
    """Fail early, naming the cause, when onnxruntime cannot run the float model on a calibration sample."""
    try:
        _run(model, sample)
    except Exception as error:
        raise ValueError(f"the float model does not run in onnxruntime on the calibration inputs: {error}") from None


def model_opset(model: onnx.ModelProto) -> int:
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            return int(opset.version)
    raise ValueError("the model imports no default-domain (ai.onnx) opset")


def required_opset(candidates: Iterable[str]) -> int:
    """The opset the exported types of these candidates need (0: any; float16 needs none newer)."""
    chosen = [get_candidate(name) for name in candidates]
    bits = {candidate.weight_bits for candidate in chosen if candidate.integer_weights}
    # 16-bit Q/DQ types need opset 21 as int4 does; normalising to it here checks the upgrade, where
    # quantize_static would bump the opset itself, unchecked
    if 4 in bits or any(c.integer_activations and c.activation_bits == 16 for c in chosen):
        return OPSET_FOR_4BIT
    return OPSET_FOR_PER_CHANNEL if bits - {None} else 0


def _normalized(
    model: onnx.ModelProto | NormalizedModel, opset: int, feeds: Mapping[str, np.ndarray], axes: SampleAxes
) -> NormalizedModel:
    """The normalised model at ``opset``; a failed or mismatching upgrade (or BatchNorm fold) is an
    ``ExportError``."""
    try:
        return normalize_model(model, opset=opset, samples=feeds, sample_axes=axes)
    except (OpsetUpgradeError, BatchNormFoldError) as error:
        raise ExportError(f"{error}; not exporting it") from None


def _raise_ir_version(model: onnx.ModelProto) -> None:
    """The IR version must be new enough for the opset (int4 tensors need IR 10, which opset 21 implies).

    The version converter and onnxruntime's quantizer leave the source model's IR version in place.
    """
    required = onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    model.ir_version = max(model.ir_version, required)


def _preprocess(model: onnx.ModelProto, layers: Sequence[Layer]) -> tuple[onnx.ModelProto, str]:
    """onnxruntime's ``quant_pre_process`` (shape inference), falling back step by step when it fails.

    The graph optimizer is skipped: it may fuse or rename the nodes and weights that name layers.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    attempts = (("quant_pre_process", False), ("quant_pre_process without symbolic shape inference", True))
    failures = []
    for label, skip_symbolic in attempts:
        try:
            with tempfile.TemporaryDirectory(prefix="mpq-pre.") as directory, _working_directory(directory):
                path = Path(directory) / "pre.onnx"
                quant_pre_process(model, path, skip_optimization=True, skip_symbolic_shape=skip_symbolic)
                processed = onnx.load(path)
        except Exception as error:
            failures.append(f"{label}: {type(error).__name__}: {error}")
            continue
        if [layer.name for layer in find_layers(processed)] == [layer.name for layer in layers]:
            return processed, label
        failures.append(f"{label}: changed the layers")
    logger.warning("pre-processing skipped (%s)", "; ".join(failures))
    return model, "none (" + "; ".join(failures)[:500] + ")"


_CWD_LOCK = threading.Lock()


@contextlib.contextmanager
def _working_directory(directory: str) -> Iterator[None]:
    """Run inside ``directory``: onnxruntime's symbolic shape inference saves ``sym_shape_infer_temp.onnx``
    into the current directory when it fails, and the exporter must leave nothing behind."""
    with _CWD_LOCK:
        previous = os.getcwd()
        os.chdir(directory)
        try:
            yield
        finally:
            os.chdir(previous)


def _complete_value_types(model: onnx.ModelProto, sample: Mapping[str, np.ndarray]) -> None:
    """Give every node output a type; where inference left one out, read it off a real onnxruntime run
    on one calibration ``sample``.

    ``quantize_static`` silently leaves a tensor float when it cannot find its type.
    """
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    typed = {
        value.name
        for value in [*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info]
        if value.type.tensor_type.elem_type
    }
    typed |= {init.name for init in model.graph.initializer}
    untyped = [out for node in model.graph.node for out in node.output if out and out not in typed]
    if not untyped:
        return
    for name, array in runtime_tensors(model, sample, untyped).items():
        elem_type = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
        # Type only, no shape: a concrete shape would pin the batch size.
        model.graph.value_info.append(onnx.helper.make_tensor_value_info(name, elem_type, None))


# ---------------------------------------------------------------------------------------------
# Static quantization (w8a8, w4a8) with onnxruntime's tooling


class ArrayCalibrationReader(CalibrationDataReader):  # type: ignore[misc]  # onnxruntime ships no types
    """onnxruntime ``CalibrationDataReader`` over in-memory arrays, in batches (of exactly ``fixed``
    samples for a model whose batch dim is fixed, the last padded: a repeated sample moves no
    min/max range). Each input is cut along its sample axis (``axes``; default 0), a shared one
    (axis None) goes whole into every batch."""

    def __init__(
        self, feeds: Mapping[str, np.ndarray], batch_size: int, fixed: int | None = None, axes: SampleAxes | None = None
    ) -> None:
        self._feeds = dict(feeds)
        self._axes = dict(axes or {})
        self._count = sample_count(self._feeds, self._axes)
        self._batch_size = fixed or batch_size
        self._fixed = fixed
        self.set_range(0, self._count)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._starts = iter(range(start_index, min(end_index, self._count), self._batch_size))
        self._end = min(end_index, self._count)

    def get_next(self) -> dict[str, np.ndarray] | None:
        start = next(self._starts, None)
        if start is None:
            return None
        rows = padded_rows(start, min(start + self._batch_size, self._end), self._fixed)
        return take_samples(self._feeds, rows, self._axes)

    def __len__(self) -> int:
        return math.ceil(self._count / self._batch_size)


def _quantize_static(
    model: onnx.ModelProto,
    layers: Sequence[Layer],
    configuration: Configuration,
    nodes: Mapping[str, Sequence[str]],
    feeds: Mapping[str, np.ndarray],
    axes: SampleAxes,
    calibrate_method: str,
    batch_size: int,
) -> onnx.ModelProto:
    methods = {m.name.lower(): m for m in CalibrationMethod}
    overrides = _activation_overrides(layers, configuration, nodes, model)
    overrides.update(
        {layer.name: _weight_overrides(model, layer, _weight_bits(configuration, layer.name)) for layer in layers}
    )
    with tempfile.TemporaryDirectory(prefix="mpq-quant.") as directory:
        output = Path(directory) / "quantized.onnx"
        try:
            quantize_static(
                model,
                output,
                ArrayCalibrationReader(feeds, batch_size, fixed_batch(model, axes), axes),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                reduce_range=False,  # Q_b uses the full restricted range [-127, 127]
                # uint8 activations with int8 weights: onnxruntime's recommendation for x86 CPUs.
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_quantize=[node for layer in layers for node in nodes[layer.name]],
                calibrate_method=methods[calibrate_method.lower()],
                extra_options={
                    "TensorQuantOverrides": overrides,
                    "WeightSymmetric": True,
                    # Keep Q_b's weight scales even where a bias would need a larger one: the exported
                    # weights must be the integers the sensitivity analysis predicted.
                    "QDQDisableWeightAdjustForInt32Bias": True,
                },
            )
            return onnx.load(output)
        except Exception as error:
            raise ExportError(f"onnxruntime quantize_static failed: {type(error).__name__}: {error}") from error


def _activation_overrides(
    layers: Sequence[Layer], configuration: Configuration, nodes: Mapping[str, Sequence[str]], model: onnx.ModelProto
) -> dict[str, list[dict[str, Any]]]:
    """uint16 for the inputs and outputs of the layers at 16-bit activations (``w8a16``); the rest
    keep ``quantize_static``'s uint8. A tensor between a 16-bit and an 8-bit layer gets 16 bits."""
    sixteen = {
        n for layer in layers if configuration.candidate(layer.name).activation_bits == 16 for n in nodes[layer.name]
    }
    tensors = {
        tensor
        for node in model.graph.node
        if node.name in sixteen
        for tensor in (node.input[0], *node.output)
        if tensor
    }
    return {tensor: [{"quant_type": QuantType.QUInt16}] for tensor in sorted(tensors)}


def _weight_bits(configuration: Configuration, layer: str) -> int:
    """The weight bits of a layer whose candidate quantizes its weight."""
    bits = configuration.candidate(layer).weight_bits
    if bits is None:
        raise ValueError(f"layer {layer!r} keeps its float weight ({configuration.candidate(layer).name})")
    return bits


def _weight_overrides(model: onnx.ModelProto, layer: Layer, bits: int) -> list[dict[str, Any]]:
    """``TensorQuantOverrides`` for one weight: its per-channel axis; for int4 also Q_b's scales."""
    if bits == 8:
        return [{"axis": layer.channel_axis}]
    if bits == 4:
        # onnxruntime's symmetric int4 would use [-8, 7] and scale 2·absmax/15; give it Q_b's scales
        # (restricted range [-7, 7]) so it stores Q_b's integers.
        quantized = quantize_weight(weight_array(model, layer.name), 4, layer.channel_axis)
        return [
            {"quant_type": QuantType.QInt4, "axis": layer.channel_axis, "scale": float(scale), "zero_point": 0}
            for scale in quantized.scales
        ]
    raise ValueError(f"no exporter for {bits}-bit weights")


# ---------------------------------------------------------------------------------------------
# Weight-only quantization (w8, w4): hand-written DequantizeLinear


def _add_weight_only_dequantize(
    model: onnx.ModelProto, layer: Layer, bits: int, nodes: Sequence[onnx.NodeProto]
) -> None:
    """Replace the float weight by Q_b's integers and scales behind a per-channel DequantizeLinear.

    Hand-written because onnxruntime's tooling has no weight-only mode for Conv/Gemm (see module doc).
    """
    quantized = quantize_weight(weight_array(model, layer.name), bits, layer.channel_axis)
    taken = {init.name for init in model.graph.initializer} | {o for n in model.graph.node for o in n.output}
    names = {part: unique_name(f"{layer.name}_{part}", taken) for part in ("quantized", "scale", "zero_point")}
    output = unique_name(f"{layer.name}_DequantizeLinear_Output", taken)
    channels = quantized.scales.size
    model.graph.initializer.extend(
        [
            _integer_tensor(names["quantized"], quantized.integers, bits),
            numpy_helper.from_array(quantized.scales, names["scale"]),
            _integer_tensor(names["zero_point"], np.zeros(channels, dtype=np.int8), bits),
        ]
    )
    dequantize = onnx.helper.make_node(
        "DequantizeLinear",
        [names["quantized"], names["scale"], names["zero_point"]],
        [output],
        name=unique_name(f"{layer.name}_DequantizeLinear", {n.name for n in model.graph.node}),
        axis=quantized.axis,
    )
    model.graph.node.insert(0, dequantize)  # its inputs are initializers, so the front keeps topological order
    for node in nodes:
        node.input[node_weight_index(node.op_type, layer)] = output
    _remove_unused_initializer(model, layer.name)


def _integer_tensor(name: str, integers: np.ndarray, bits: int) -> onnx.TensorProto:
    if bits == 8:
        return numpy_helper.from_array(integers.astype(np.int8), name)
    # Raw little-nibble-first packing, two values per byte (ONNX's int4 layout); make_tensor's non-raw
    # path would store every packed byte as a varint in int32_data, about 1.5x larger.
    flat = integers.astype(np.int8).ravel()
    if flat.size % 2:
        flat = np.append(flat, np.int8(0))
    nibbles = flat.view(np.uint8) & 0x0F
    packed = (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8)
    return onnx.helper.make_tensor(name, _INT_TYPES[bits], integers.shape, packed.tobytes(), raw=True)


def _remove_unused_initializer(model: onnx.ModelProto, name: str) -> None:
    if any(name in node.input for node in model.graph.node) or any(o.name == name for o in model.graph.output):
        return
    kept = [init for init in model.graph.initializer if init.name != name]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    kept_inputs = [value for value in model.graph.input if value.name != name]
    del model.graph.input[:]
    model.graph.input.extend(kept_inputs)


# ---------------------------------------------------------------------------------------------
# Checks, plan and serialization


def _nodes_named(model: onnx.ModelProto, names: Sequence[str]) -> list[onnx.NodeProto]:
    by_name = {node.name: node for node in model.graph.node}
    return [by_name[name] for name in names]


def _check_layers_quantized(
    model: onnx.ModelProto,
    configuration: Configuration,
    nodes: Mapping[str, Sequence[str]],
    layers: Mapping[str, Layer],
) -> None:
    """Every quantized layer must end up with a dequantized weight (and input, for static candidates)."""
    producers = {out: node for node in model.graph.node for out in node.output}
    by_name = {node.name: node for node in model.graph.node}
    problems = []
    for layer, candidate_name in configuration.items():
        candidate = get_candidate(candidate_name)
        for node_name in nodes[layer]:
            node = by_name.get(node_name)
            if node is None:
                problems.append(f"layer {layer!r}: node {node_name!r} disappeared")
                continue
            weight = node.input[node_weight_index(node.op_type, layers[layer])]
            weight_dq = _is_dequantized(weight, producers)
            input_dq = _is_dequantized(node.input[0], producers)
            if candidate.float16 and not _reads_float16(weight, layer, producers):
                problems.append(f"layer {layer!r} (fp16): node {node.name!r} does not read its float16 weight")
            if candidate.integer_weights and not weight_dq:
                problems.append(f"layer {layer!r} ({candidate_name}): node {node.name!r} has a float weight")
            if _is_static(candidate, layers[layer]) and not input_dq:
                problems.append(
                    f"layer {layer!r} ({candidate_name}): the input {node.input[0]!r} of node {node.name!r} "
                    "was not quantized (its type or shape could not be inferred)"
                )
            if not candidate.quantizes_weights and weight_dq:
                problems.append(f"layer {layer!r} (fp32): the weight of node {node.name!r} was quantized")
    if problems:
        raise ExportError("the exported graph does not implement the configuration: " + "; ".join(problems))


def _reads_float16(tensor: str, layer: str, producers: Mapping[str, onnx.NodeProto]) -> bool:
    """The node reads the layer's float16 weight itself, or through a Cast to float32."""
    producer = producers.get(tensor)
    stored = float16_weight_name(layer)
    return tensor == stored or (producer is not None and producer.op_type == "Cast" and producer.input[0] == stored)


def _is_dequantized(tensor: str, producers: Mapping[str, onnx.NodeProto]) -> bool:
    producer = producers.get(tensor)
    return producer is not None and producer.op_type == "DequantizeLinear"


def _is_static(candidate: Candidate, layer: Layer) -> bool:
    """Whether the layer's activations are quantized too (``quantize_static``); a Gather has none."""
    return candidate.integer_activations and layer.has_float_input


def _exported_layers(
    configuration: Configuration, nodes: Mapping[str, Sequence[str]], by_name: Mapping[str, Layer]
) -> dict[str, ExportedLayer]:
    layers = {}
    for name, candidate_name in configuration.items():
        candidate = get_candidate(candidate_name)
        static = _is_static(candidate, by_name[name])
        if static:
            method = "onnxruntime.quantize_static"
        elif candidate.float16:
            method = "float16"
        elif candidate.quantizes_weights:
            method = "weight_only_dequantize"
        else:
            method = "float"
        layers[name] = ExportedLayer(
            name=name,
            candidate=candidate_name,
            node_names=tuple(nodes[name]),
            weight_input=by_name[name].weight_index,
            weight_bits=candidate.weight_bits,
            activation_bits=candidate.activation_bits if static or candidate.float16 else None,
            method=method,
        )
    return layers


def _plan(
    configuration: Configuration,
    layers: Mapping[str, ExportedLayer],
    constraints: Mapping[str, Any] | None,
    calibrate_method: str,
    samples: int,
    source_opset: int,
    model: onnx.ModelProto,
) -> dict[str, Any]:
    return {
        "format": PLAN_FORMAT,
        "configuration": configuration.to_dict(),
        "layers": {
            name: {
                "candidate": layer.candidate,
                "weight_bits": layer.weight_bits,
                "activation_bits": layer.activation_bits,
                "nodes": list(layer.node_names),
                "weight_input": layer.weight_input,
                "method": layer.method,
            }
            for name, layer in layers.items()
        },
        "constraints": dict(constraints) if constraints is not None else None,
        "calibration": {
            "method": calibrate_method.lower(),
            "samples": samples,
            "activation_type": "uint8 (uint16 for 16-bit activation candidates)",
            "weight_quantizer": "symmetric per-channel, restricted range (sensitivity.quantize)",
        },
        "opset": {"source": source_opset, "exported": model_opset(model)},
        "versions": versions(),
    }


def versions() -> dict[str, str]:
    """Versions stored with every artifact."""
    import onnxruntime  # noqa: F401  (imported: its __version__ is what ran, whichever distribution)

    return package_versions("mpq", "onnx", "onnxruntime", "numpy")


def _write_metadata(model: onnx.ModelProto, plan: Mapping[str, Any], metadata: Mapping[str, str] | None) -> None:
    entries = {PLAN_METADATA_KEY: json.dumps(plan, sort_keys=True), **dict(metadata or {})}
    kept = [prop for prop in model.metadata_props if prop.key not in entries]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)


def read_plan(model: onnx.ModelProto | bytes) -> dict[str, Any]:
    """The plan stored in an exported model's metadata."""
    proto = onnx.load_from_string(model) if isinstance(model, bytes) else model
    for prop in proto.metadata_props:
        if prop.key == PLAN_METADATA_KEY:
            plan: dict[str, Any] = json.loads(prop.value)
            return plan
    raise ValueError(f"the model has no {PLAN_METADATA_KEY!r} metadata; was it exported by planner.export?")


def stored_weight(model: onnx.ModelProto, layer: str) -> QuantizedWeight | None:
    """Read back the integers and scales stored for a layer (``None`` when it is float).

    Follows the layer's first node's weight input to its DequantizeLinear; int4 is unpacked to int8.
    """
    plan = read_plan(model)
    if layer not in plan["layers"]:
        raise KeyError(f"no layer {layer!r} in the exported plan")
    entry = plan["layers"][layer]
    node = next(node for node in model.graph.node if node.name == entry["nodes"][0])
    weight = node.input[entry.get("weight_input", weight_index(node.op_type))]  # older plans lack it
    producer = next((n for n in model.graph.node if weight in n.output), None)
    if producer is None or producer.op_type != "DequantizeLinear":
        return None
    initializers = {init.name: init for init in model.graph.initializer}
    integers_proto = initializers[producer.input[0]]
    integers = numpy_helper.to_array(integers_proto).astype(np.int8)
    scales = numpy_helper.to_array(initializers[producer.input[1]]).astype(np.float32)
    axis = next((a.i for a in producer.attribute if a.name == "axis"), 1)
    bits = {TensorProto.INT8: 8, TensorProto.INT4: 4}.get(integers_proto.data_type)
    if bits is None:
        raise ValueError(f"layer {layer!r} stores weights of ONNX type {integers_proto.data_type}")
    return QuantizedWeight(integers=integers, scales=scales, axis=axis % integers.ndim, bits=bits)


def _serialize(model: onnx.ModelProto) -> bytes:
    try:
        serialized: bytes = model.SerializeToString()
    except ValueError as error:  # protobuf's 2 GiB limit
        raise ExportError(f"the exported model cannot be serialized: {error}") from error
    return serialized


def validate_artifact(
    model_bytes: bytes, feeds: Mapping[str, np.ndarray], *, batch_size: int = 64, sample_axes: SampleAxes | None = None
) -> None:
    """``onnx.checker`` and a real onnxruntime run over ``feeds`` (cut along ``sample_axes``, merged
    over the artifact's declared input shapes); ExportError on any failure."""
    try:
        model = onnx.load_from_string(model_bytes)
        onnx.checker.check_model(model)
    except Exception as error:
        raise ExportError(f"the exported model fails onnx.checker: {error}") from error
    axes = input_sample_axes(model, sample_axes)
    del model  # the session reads the bytes; the parsed copy is not needed beside it
    try:
        session = _session(model_bytes)
        start = 0
        for batch, real in batches(feeds, batch_size, session_fixed_batch(session, axes), axes):
            outputs = session.run(None, batch)
            bad = [i for i, out in enumerate(outputs) if _is_float(out) and not np.isfinite(out).all()]
            if bad:
                raise ExportError(f"output(s) {bad} are not finite on calibration samples {start}..")
            start += real
    except ExportError:
        raise
    except Exception as error:
        raise ExportError(f"the exported model does not run in onnxruntime: {error}") from error


def _is_float(array: np.ndarray) -> bool:
    return np.issubdtype(array.dtype, np.floating)


def _session(model: onnx.ModelProto | bytes) -> Any:
    return cpu_session(model if isinstance(model, bytes) else model.SerializeToString())


def _run(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    outputs: list[np.ndarray] = _session(model).run(None, dict(feeds))
    return outputs

"""Measured activation-quantization terms: what 8-bit activations cost each layer, in loss.

The Hessian terms (Ω, g·Δ, G) see weights only, so without this ``w8a8`` and ``w8`` (and ``w4a8``
and ``w4``) are predicted alike although the weight-only candidates measure better. Activation
noise has no cheap Hessian form that matches what onnxruntime does, so it is measured instead:

1. the exporter quantizes every layer at ``w8a8`` once; the activation tensors onnxruntime puts
   QuantizeLinear on, with the scale and zero point its calibration chose, are read off that
   artifact (onnxruntime decides which tensors: a layer's input, and for MatMul/Gemm its output);
2. for each layer, the float model gets QuantizeLinear → DequantizeLinear on just that layer's
   tensors (its inputs and outputs among them), and onnxruntime runs it over the calibration set;
3. the layer's term aᵢ is the mean per-sample change of the calibration loss (the same loss as the
   sensitivity analysis) against the float model, with its standard error over the samples.

The objective adds aᵢ to each of layer i's candidates that quantize activations to 8 bits. Additivity is an
approximation: a tensor between two layers (one's output, the next one's input) is counted in
both terms, and activation and weight errors are assumed not to interact.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from planner.checks import json_object, real, texts
from planner.cost import layer_nodes
from planner.evaluate import log_softmax, run_batched_outputs
from planner.export import check_inputs, export_model, model_opset
from sensitivity.layers import find_layers
from sensitivity.losses import LOSS_KINDS, PROBABILITY_FLOOR
from sensitivity.samples import SampleAxes, input_sample_axes

ACTIVATION_TERM_BITS = 8  # the activation width the terms measure (uniform w8a8)
QDQ_OPSET = 13  # per-tensor QuantizeLinear with a uint8 zero point is older, but the exporter's floor is 13
RENAMED_OUTPUT_SUFFIX = "_QuantizeLinear_Input"  # onnxruntime renames a quantized graph output's producer


@dataclass(frozen=True)
class ActivationQuantization:
    """One activation tensor as onnxruntime quantizes it (per tensor, asymmetric)."""

    tensor: str
    scale: float
    zero_point: int
    zero_point_type: int  # onnx.TensorProto data type (UINT8 for the exporter's activations)


@dataclass(frozen=True)
class ActivationTerm:
    """Layer's measured activation-quantization term: calibration loss change, nats."""

    layer: str
    tensors: tuple[str, ...]
    loss_change: float  # mean over the calibration samples
    standard_error: float  # of that mean, over the samples

    def to_dict(self) -> dict[str, object]:
        """The term without its layer: results key their terms by layer (``PlanResult.activation_terms``)."""
        return {"tensors": list(self.tensors), "loss_change": self.loss_change, "standard_error": self.standard_error}

    @classmethod
    def from_dict(cls, layer: str, data: Any) -> ActivationTerm:
        fields = json_object(data, f"the activation term of {layer!r}", ("tensors", "loss_change", "standard_error"))
        return cls(
            layer=layer,
            tensors=texts("tensors", fields["tensors"]),
            loss_change=real("loss_change", fields["loss_change"]),
            standard_error=real("standard_error", fields["standard_error"]),
        )


def activation_terms(
    model: onnx.ModelProto,
    calibration: Mapping[str, np.ndarray],
    loss_kind: str,
    *,
    batch_size: int = 256,
    w8a8_artifact: bytes | None = None,
    sample_axes: SampleAxes | None = None,
) -> dict[str, ActivationTerm]:
    """aᵢ for every layer of ``model`` (see the module doc); ``loss_kind`` as the sensitivity result's;
    ``w8a8_artifact``: see ``activation_quantization``; ``sample_axes``: see ``sensitivity.samples``."""
    if loss_kind not in LOSS_KINDS:
        raise ValueError(f"loss_kind must be one of {LOSS_KINDS}; got {loss_kind!r}")
    feeds = check_inputs(model, calibration, what="calibration set", sample_axes=sample_axes)
    axes = input_sample_axes(model, sample_axes)
    float_model = _with_qdq_opset(model)
    quantized = activation_quantization(model, calibration, w8a8_artifact, sample_axes=axes)
    reference = run_outputs(float_model, feeds, batch_size, axes)
    loss = SampleLoss(loss_kind, reference, calibration.get("labels"))
    terms = {}
    for layer, tensors in _layer_tensors(float_model, quantized).items():
        if tensors:
            outputs = run_outputs(
                _with_fake_quantization(float_model, [quantized[t] for t in tensors]), feeds, batch_size, axes
            )
            terms[layer] = ActivationTerm(layer, tensors, *mean_with_error(loss(outputs) - loss(reference)))
        else:
            terms[layer] = ActivationTerm(layer, (), 0.0, 0.0)
    return terms


def activation_quantization(
    model: onnx.ModelProto,
    calibration: Mapping[str, np.ndarray],
    w8a8_artifact: bytes | None = None,
    *,
    sample_axes: SampleAxes | None = None,
) -> dict[str, ActivationQuantization]:
    """The activation tensors of ``model`` that the exporter quantizes when every layer is ``w8a8``.

    ``w8a8_artifact``: that export of ``model`` when the caller has it already (``plan()`` shares
    the one it measures as the uniform baseline); otherwise it is exported here.
    """
    if w8a8_artifact is None:
        configuration = {layer.name: "w8a8" for layer in find_layers(model)}
        w8a8_artifact = export_model(model, configuration, calibration, sample_axes=sample_axes).model_bytes
    exported = onnx.load_from_string(w8a8_artifact)
    protos = {init.name: init for init in exported.graph.initializer}
    initializers = {name: numpy_helper.to_array(proto) for name, proto in protos.items()}
    names = _tensor_names(model)
    found = {}
    for node in exported.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in initializers:
            continue
        tensor = node.input[0]
        if tensor not in names and tensor.endswith(RENAMED_OUTPUT_SUFFIX):
            tensor = tensor.removesuffix(RENAMED_OUTPUT_SUFFIX)
        if tensor not in names:
            continue  # a tensor of the exporter's own making; the float model has no such value
        scale, zero_point = node.input[1], node.input[2]
        found[tensor] = ActivationQuantization(
            tensor, float(initializers[scale]), int(initializers[zero_point]), protos[zero_point].data_type
        )
    return found


def _tensor_names(model: onnx.ModelProto) -> set[str]:
    return {name for node in model.graph.node for name in (*node.input, *node.output)} | {
        value.name for value in model.graph.input
    }


def _layer_tensors(
    model: onnx.ModelProto, quantized: Mapping[str, ActivationQuantization]
) -> dict[str, tuple[str, ...]]:
    """Each layer's quantized activations: the non-weight inputs and the outputs of its nodes."""
    initializers = {init.name for init in model.graph.initializer}
    result = {}
    for layer, nodes in layer_nodes(model).items():
        adjacent = [name for node in nodes for name in (*node.input, *node.output) if name not in initializers]
        result[layer] = tuple(dict.fromkeys(name for name in adjacent if name in quantized))
    return result


def _with_qdq_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    if model_opset(model) >= QDQ_OPSET:
        return model
    return onnx.version_converter.convert_version(model, QDQ_OPSET)


def _with_fake_quantization(model: onnx.ModelProto, tensors: Sequence[ActivationQuantization]) -> onnx.ModelProto:
    """A copy of ``model`` in which every consumer of each tensor reads it quantized and dequantized,
    as in onnxruntime's QDQ artifacts (a graph output keeps its name and is quantized too)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    outputs = {value.name for value in graph.output}
    for quantization in tensors:
        name = quantization.tensor
        source = name + "_mpq_float" if name in outputs else name
        if source != name:  # the producer writes the float value under a new name; the DQ takes the old one
            for node in graph.node:
                node.output[:] = [source if out == name else out for out in node.output]
        dequantized = name if source != name else name + "_mpq_dequantized"
        for node in graph.node:
            node.input[:] = [dequantized if value == name else value for value in node.input]
        scale, zero_point = name + "_mpq_scale", name + "_mpq_zero_point"
        graph.initializer.extend(
            [
                numpy_helper.from_array(np.array(quantization.scale, dtype=np.float32), scale),
                helper.make_tensor(zero_point, quantization.zero_point_type, [], [quantization.zero_point]),
            ]
        )
        pair = [
            helper.make_node("QuantizeLinear", [source, scale, zero_point], [name + "_mpq_quantized"]),
            helper.make_node("DequantizeLinear", [name + "_mpq_quantized", scale, zero_point], [dequantized]),
        ]
        _insert_after_producer(graph, source, pair)
    return copy


def _insert_after_producer(graph: onnx.GraphProto, tensor: str, nodes: Sequence[onnx.NodeProto]) -> None:
    """Keep the graph topologically sorted (onnxruntime needs it): right after ``tensor``'s
    producer, or first when a graph input or initializer holds it."""
    existing = list(graph.node)
    producer = next((i for i, node in enumerate(existing) if tensor in node.output), -1)
    existing[producer + 1 : producer + 1] = nodes
    del graph.node[:]
    graph.node.extend(existing)


def mean_with_error(changes: np.ndarray) -> tuple[float, float]:
    """The mean of per-sample changes and its standard error (sample SD over √N); with one sample,
    its own size (nothing smaller is known)."""
    if len(changes) > 1:
        return float(changes.mean()), float(changes.std(ddof=1) / np.sqrt(len(changes)))
    return float(changes[0]), abs(float(changes[0]))


def run_outputs(
    model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], batch_size: int, axes: SampleAxes | None = None
) -> list[np.ndarray]:
    """Every output over all samples, float64, in its per-sample shape (the sequence losses need [N, T, C])."""
    return run_batched_outputs(model.SerializeToString(), feeds, batch_size, flatten=False, sample_axes=axes)


class SampleLoss:
    """Per-sample calibration loss in numpy, as ``sensitivity.losses.CalibrationLoss.sample_losses``
    for every one of its ``LOSS_KINDS`` (same formulas, same probability floor; the test compares
    them). ``reference``: the float model's outputs over the calibration set, ``[samples, ...]``;
    ``distill_normalized_mse`` divides each output's squared error by its mean square there."""

    def __init__(self, kind: str, reference: Sequence[np.ndarray], labels: np.ndarray | None) -> None:
        if kind == "cross_entropy" and labels is None:
            raise ValueError("loss kind 'cross_entropy' needs labels in the calibration set")
        self.kind = kind
        self.reference = reference
        self.targets = _targets(kind, reference[0], labels)
        self.scales = [1.0] * len(reference)
        if kind == "distill_normalized_mse":
            squares = [float(np.mean(ref**2)) for ref in reference]
            self.scales = [1.0 / square if square > 0.0 else 1.0 for square in squares]

    def __call__(self, outputs: Sequence[np.ndarray]) -> np.ndarray:
        first, *rest = (_per_sample(positions) for positions in self._position_losses(outputs))
        return sum(rest, first)

    def _position_losses(self, outputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """As ``sensitivity.losses.position_losses``: per output, the loss at every position."""
        kind = self.kind
        if kind in ("cross_entropy", "distill_cross_entropy"):  # class axis 1
            targets = self._targets()
            return [-np.take_along_axis(log_softmax(outputs[0], axis=1), targets[:, None], axis=1)[:, 0]]
        if kind == "distill_step_cross_entropy":  # class axis last
            targets = self._targets()
            return [-np.take_along_axis(log_softmax(outputs[0], axis=-1), targets[..., None], axis=-1)[..., 0]]
        if kind in ("distill_kl", "distill_kl_log_probs"):
            targets = self._targets()
            return [np.sum(np.exp(targets) * (targets - _log_distribution(kind, outputs[0])), axis=-1)]
        if kind == "distill_binary_kl":
            p0, p = self.reference[0], outputs[0]
            kl = p0 * (_floored_log(p0) - _floored_log(p)) + (1 - p0) * (_floored_log(1 - p0) - _floored_log(1 - p))
            return [np.sum(kl, axis=-1)]
        return [scale * (out - ref) ** 2 for out, ref, scale in zip(outputs, self.reference, self.scales)]

    def _targets(self) -> np.ndarray:
        """The targets of a loss kind that has them (``_targets`` gives them to every kind that reads them)."""
        if self.targets is None:
            raise ValueError(f"loss kind {self.kind!r} has no targets")
        return self.targets


def _targets(kind: str, first: np.ndarray, labels: np.ndarray | None) -> np.ndarray | None:
    """As ``sensitivity.losses.loss_targets`` (the labels for ``cross_entropy``; None where the
    reference outputs are the targets)."""
    if kind == "cross_entropy":
        return np.asarray(labels)
    if kind in ("distill_cross_entropy", "distill_step_cross_entropy"):  # the class axis: 1, or last
        classes: np.ndarray = first.argmax(axis=1 if kind == "distill_cross_entropy" else -1)
        return classes
    if kind in ("distill_kl", "distill_kl_log_probs"):
        return _log_distribution(kind, first)
    return None


def _per_sample(positions: np.ndarray) -> np.ndarray:
    means: np.ndarray = positions.reshape(len(positions), -1).mean(axis=1)
    return means


def _floored_log(values: np.ndarray) -> np.ndarray:
    logs: np.ndarray = np.log(np.maximum(values, PROBABILITY_FLOOR))
    return logs


def _log_distribution(kind: str, out: np.ndarray) -> np.ndarray:
    """As ``sensitivity.losses._log_distribution``: log p over the last axis, renormalised."""
    return log_softmax(out if kind == "distill_kl_log_probs" else _floored_log(out), axis=-1)

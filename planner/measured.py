"""The ``measured`` signal: each layer, each candidate, quantized alone in the exported onnxruntime
model, and the calibration loss change that measures.

For layer i and candidate b the configuration "i at b, every other layer fp32" is exported
(``planner.export.export_model``: the same artifact a plan would ship) and run in onnxruntime over
the calibration set; the term is the mean per-sample change of the calibration loss against the float
model (ℓₙ(quantized) − ℓₙ(float), the sensitivity analysis's loss kind, ``planner.activation``'s numpy
losses), with its standard error over the samples. It needs no Hessian and makes no Taylor
approximation: what it misses is only how layers interact (the planner adds the terms, ``fisher``'s
diagonal adapter with Ω = 2ΔL) and the calibration set's sampling noise.

Where it lives: the terms need the exporter and onnxruntime, so the analysis is here, in ``planner``;
its configuration (``MeasuredConfig``) and result (``MeasuredTerms``) are in ``sensitivity.results``
beside the other analyses', so stored sensitivity results round-trip without importing ``planner``
(``sensitivity`` never imports it). Importing this module registers MeasuredConfig's handler with
``sensitivity.run.compute_sensitivity``, which then runs it like any other analysis (the loss kind,
L(W₀) and the layers come from the same place as every other signal's).

``LossChangeMeter`` and ``configuration_loss_changes`` measure any configuration's per-sample loss
change (and KL to the float model's class distribution) on any data: the fidelity benchmark
(``bench/fidelity.py``) measures its ground truth with them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from planner.activation import SampleLoss, mean_with_error, run_outputs
from planner.candidates import CANDIDATES
from planner.export import ExportError, check_inputs, export_model
from planner.objective import FP32
from sensitivity.layers import find_layers
from sensitivity.losses import LOSS_KINDS
from sensitivity.results import (
    MEASURABLE_CANDIDATES,
    MEASURED_CANDIDATES,
    MEASURED_QUANTITIES,
    MeasuredConfig,
    MeasuredTerms,
)
from sensitivity.run import Context, Progress, register_handler
from sensitivity.samples import SampleAxes, input_sample_axes

# The KL to the float model's distribution, per loss kind whose first output is a distribution over
# classes (as logits, probabilities or log-probabilities): the numpy loss of that kind against the
# float outputs. Logits go through log_softmax, which is what distill_kl_log_probs does to its outputs.
KL_KINDS = {
    "cross_entropy": "distill_kl_log_probs",
    "distill_cross_entropy": "distill_kl_log_probs",
    "distill_step_cross_entropy": "distill_kl_log_probs",
    "distill_kl": "distill_kl",
    "distill_kl_log_probs": "distill_kl_log_probs",
    "distill_binary_kl": "distill_binary_kl",
}
assert set(MEASURABLE_CANDIDATES) == set(CANDIDATES) - {FP32}, (
    "sensitivity.results.MEASURABLE_CANDIDATES is out of date"
)


@dataclass(frozen=True)
class SampleChanges:
    """One configuration's per-sample changes against the float model: ``loss`` (the loss kind's),
    ``kl`` (KL from the float model's class distribution; None where the output is no distribution)."""

    loss: np.ndarray
    kl: np.ndarray | None


class LossChangeMeter:
    """The float ``model``'s outputs and per-sample loss on ``data``, computed once; then any exported
    model's (or configuration's) per-sample changes against them on the same samples.

    ``loss_kind``: one of ``sensitivity.losses.LOSS_KINDS`` (``cross_entropy`` needs ``labels`` in
    ``data``); ``sample_axes``: see ``sensitivity.samples``."""

    def __init__(
        self,
        model: onnx.ModelProto,
        data: Mapping[str, np.ndarray],
        loss_kind: str,
        *,
        batch_size: int = 256,
        sample_axes: SampleAxes | None = None,
    ) -> None:
        if loss_kind not in LOSS_KINDS:
            raise ValueError(f"loss_kind must be one of {LOSS_KINDS}; got {loss_kind!r}")
        self.model = model
        self.sample_axes = sample_axes
        self.batch_size = batch_size
        self.feeds = check_inputs(model, data, what="data", sample_axes=sample_axes)
        self.axes = input_sample_axes(model, sample_axes)
        reference = run_outputs(model, self.feeds, batch_size, self.axes)
        self.loss = SampleLoss(loss_kind, reference, data.get("labels"))
        self.float_loss = self.loss(reference)
        kl_kind = KL_KINDS.get(loss_kind)
        self.kl = None if kl_kind is None else SampleLoss(kl_kind, reference, None)

    @property
    def num_samples(self) -> int:
        return len(self.float_loss)

    def changes(self, quantized: onnx.ModelProto) -> SampleChanges:
        """Per-sample changes of the ``quantized`` model (an export of ``model``) against the float one."""
        outputs = run_outputs(quantized, self.feeds, self.batch_size, self.axes)
        return SampleChanges(self.loss(outputs) - self.float_loss, None if self.kl is None else self.kl(outputs))

    def configuration_changes(
        self, configuration: Mapping[str, str], calibration: Mapping[str, np.ndarray]
    ) -> SampleChanges:
        """Export ``configuration`` of ``model`` (activation ranges calibrated on ``calibration``) and
        measure it on this meter's data."""
        exported = export_model(self.model, configuration, calibration, sample_axes=self.sample_axes)
        return self.changes(exported.load())


def configuration_loss_changes(
    model: onnx.ModelProto,
    configuration: Mapping[str, str],
    calibration: Mapping[str, np.ndarray],
    loss_kind: str,
    *,
    data: Mapping[str, np.ndarray] | None = None,
    batch_size: int = 256,
    sample_axes: SampleAxes | None = None,
) -> np.ndarray:
    """Per-sample loss change of ``configuration`` exported from ``model`` (activation ranges calibrated on
    ``calibration``) against the float model, on ``data`` (default: ``calibration``): ℓₙ(quantized) −
    ℓₙ(float) for each sample n, the ``loss_kind`` loss in numpy (``planner.activation``)."""
    meter = LossChangeMeter(
        model, calibration if data is None else data, loss_kind, batch_size=batch_size, sample_axes=sample_axes
    )
    return meter.configuration_changes(configuration, calibration).loss


def single_layer_configurations(
    layers: Sequence[str], candidates: Sequence[str]
) -> list[tuple[tuple[str, str], dict[str, str]]]:
    """((layer, candidate), configuration) for each layer and candidate: that layer at that candidate,
    every other layer fp32."""
    return [
        ((layer, candidate), {name: candidate if name == layer else FP32 for name in layers})
        for layer in layers
        for candidate in candidates
    ]


def measured_terms(
    model: onnx.ModelProto,
    calibration: Mapping[str, np.ndarray],
    loss_kind: str,
    candidates: Sequence[str] = MEASURED_CANDIDATES,
    *,
    quantity: str = "loss",
    batch_size: int = 256,
    sample_axes: SampleAxes | None = None,
    progress: Progress | None = None,
) -> MeasuredTerms:
    """Each layer of ``model`` quantized alone to each of ``candidates``: the mean per-sample loss
    change (``quantity`` "kl": KL from the float model's distribution; "auto": kl where the loss kind
    has a KL form, else loss) on ``calibration`` and its standard error (see the module doc)."""
    unknown = [c for c in candidates if c not in MEASURABLE_CANDIDATES]
    if unknown:
        raise ValueError(f"cannot measure candidates {unknown}; measurable: {MEASURABLE_CANDIDATES}")
    if quantity not in MEASURED_QUANTITIES:
        raise ValueError(f"quantity must be one of {MEASURED_QUANTITIES}; got {quantity!r}")
    if quantity == "auto":
        quantity = "kl" if loss_kind in KL_KINDS else "loss"
    if quantity == "kl" and loss_kind not in KL_KINDS:
        raise ValueError(
            f"quantity 'kl' needs class scores or probabilities as the first output; the loss here is {loss_kind} "
            "(use quantity 'loss')"
        )
    meter = LossChangeMeter(model, calibration, loss_kind, batch_size=batch_size, sample_axes=sample_axes)
    pairs = single_layer_configurations([layer.name for layer in find_layers(model)], candidates)
    labels, means, errors = [], [], []
    for k, (label, configuration) in enumerate(pairs):
        try:
            changes = meter.configuration_changes(configuration, calibration)
            change = changes.kl if quantity == "kl" and changes.kl is not None else changes.loss
        except ExportError as error:
            raise ExportError(f"layer {label[0]!r} at {label[1]} does not export alone: {error}") from error
        mean, standard_error = mean_with_error(change)
        labels.append(label)
        means.append(mean)
        errors.append(standard_error)
        if progress is not None:
            progress("measured", (k + 1) / len(pairs), f"{label[0]} at {label[1]}: {mean:+.3g} ± {standard_error:.2g}")
    return MeasuredTerms(tuple(labels), tuple(means), tuple(errors), meter.num_samples, quantity)


@register_handler(MeasuredConfig)
def _measured(context: Context, config: MeasuredConfig) -> None:
    normalization = getattr(context.program, "normalization", None)
    if normalization is None:
        raise ValueError(
            "method 'measured' runs the model's ONNX export in onnxruntime; this program has no ONNX model "
            "(give the ONNX model, or a .pt2, which is exported to ONNX first)"
        )
    program, calibration = context.program, context.calibration
    context.fields["measured"] = context.timed(
        "measured",
        lambda: measured_terms(
            normalization.model,
            calibration,
            context.hvp.loss.kind,
            config.candidates,
            quantity=config.quantity,
            batch_size=config.batch_size,
            sample_axes=program.sample_axes,
            progress=context.progress,
        ),
    )

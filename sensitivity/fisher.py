"""Empirical Fisher diagonal and the loss change it predicts for each (layer, bits).

With ℓₙ the loss of calibration sample n (L = (1/N) Σₙ ℓₙ, ``CalibrationLoss.sample_losses``) and
gₙ = ∇ℓₙ its per-sample gradient, the empirical Fisher diagonal is Fᵢᵢ = (1/N) Σₙ gₙ,ᵢ². It stands
in for the Hessian's diagonal (exactly the Gauss-Newton expectation for a well-specified model at its
optimum), and quantizing layer l to b bits (Δ = Q_b(W_l) − W_l, ``sensitivity.quantize``) is predicted
to change the loss by

    ΔL(l, b) = ½ Σᵢ Fᵢᵢ Δᵢ² = (1/N) Σₙ tₙ,   tₙ = ½ Σᵢ gₙ,ᵢ² Δᵢ²,

a mean over samples whose standard error is the sample SD of tₙ over √N.

The per-sample gradients come from one forward per calibration batch and the VJP of the batch's
per-sample losses against each sample's unit vector: ``probes_per_pass`` of them per vmap-batched
backward (the memory budget sizes it as for the HVPs' batched second backward), one at a time where
functorch has no batching rule. Each is reduced at once (nothing holds N gradients). Cost: N backward
passes of a batch, vmap-batched; no Hessian-vector product.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch

from sensitivity.hvp import HessianVectorProducts, _missing_batching_rule
from sensitivity.interlayer import perturbations
from sensitivity.layers import Layer
from sensitivity.losses import Batch
from sensitivity.results import FisherTerms
from sensitivity.traces import Progress

Vector = tuple[torch.Tensor, ...]

# The loss kinds whose per-sample gradients are not all 0 at the float weights. The other
# self-distillation losses (squared error, KL to the float outputs) put every sample's loss at its
# own minimum there, so each gₙ is 0 (up to rounding) and so is the empirical Fisher: no ranking.
# Cross-entropy to the float argmax is not at its minimum (the softmax is not one-hot).
FISHER_LOSS_KINDS = ("cross_entropy", "distill_cross_entropy", "distill_step_cross_entropy")


def check_loss_kind(kind: str) -> None:
    """ValueError when the empirical Fisher of a ``kind`` loss is 0 at the float weights."""
    if kind not in FISHER_LOSS_KINDS:
        raise ValueError(
            f"the empirical Fisher of the {kind} loss is 0 at the float weights (each sample's loss is at its "
            f"minimum there), so it cannot rank layers; it needs one of {FISHER_LOSS_KINDS}: give labels, or "
            "use hawq_v2"
        )


def per_sample_gradients(hvp: HessianVectorProducts, batch: Batch, rows_per_pass: int) -> Sequence[Vector]:
    """Each sample's gradient of its own loss on ``batch``: chunks of rows, each a tuple with one
    tensor per layer, of shape [rows, *weight shape]."""
    loss, names = hvp.loss, hvp.names

    def sample_losses(*params: torch.Tensor) -> torch.Tensor:
        return loss.sample_losses(dict(zip(names, params)), batch)

    values, backward = torch.func.vjp(sample_losses, *hvp.point)[:2]
    count = values.shape[0]
    basis = torch.eye(count, dtype=values.dtype, device=values.device)
    chunks: list[Vector] = []
    for start in range(0, count, rows_per_pass):
        rows = basis[start : start + rows_per_pass]
        chunks.append(_backward_rows(backward, rows, hvp))
    return chunks


def _backward_rows(backward: Callable[..., Vector], rows: torch.Tensor, hvp: HessianVectorProducts) -> Vector:
    """The VJP with each row of ``rows``, stacked: vmap-batched unless functorch cannot batch it."""
    if rows.shape[0] > 1 and hvp.batched_backward:
        try:
            return tuple(g.detach() for g in torch.func.vmap(backward)(rows))
        except RuntimeError as error:
            if not _missing_batching_rule(error):
                raise
            hvp.batched_backward = False  # the same kernels would fail on every pass
    parts = [backward(row) for row in rows]
    return tuple(torch.stack([part[k] for part in parts]).detach() for k in range(len(hvp.point)))


def fisher_terms(
    hvp: HessianVectorProducts,
    layers: Sequence[Layer],
    bits: Sequence[int],
    rows_per_pass: int,
    progress: Progress | None = None,
) -> FisherTerms:
    """Fisher traces per layer, and ΔL(l, b) = ½ Σᵢ Fᵢᵢ Δᵢ² with its standard error per (layer, bits)."""
    check_loss_kind(hvp.loss.kind)
    deltas = perturbations(layers, hvp.point, bits)
    labels = tuple(deltas)
    position = {layer.name: i for i, layer in enumerate(layers)}
    squared = {label: 0.5 * delta.double().pow(2) for label, delta in deltas.items()}
    sample_terms: dict[tuple[str, int], list[torch.Tensor]] = {label: [] for label in labels}
    fisher_sums = [torch.zeros((), dtype=torch.float64, device=w.device) for w in hvp.point]
    count, started = 0, time.monotonic()
    batches = hvp.loss.batches
    for k, batch in enumerate(batches):
        for chunk in per_sample_gradients(hvp, batch, rows_per_pass):
            squares = [g.double().pow(2) for g in chunk]
            for i, square in enumerate(squares):
                fisher_sums[i] += square.sum()
            for label in labels:
                square = squares[position[label[0]]]
                sample_terms[label].append((square * squared[label]).flatten(1).sum(dim=1).cpu())
            count += chunk[0].shape[0]
        if progress is not None:
            left = (time.monotonic() - started) / (k + 1) * (len(batches) - k - 1)
            progress("fisher", (k + 1) / len(batches), f"{count} per-sample gradients, ~{left:.0f} s left")
    means, errors = [], []
    for label in labels:
        values = torch.cat(sample_terms[label])
        means.append(float(values.mean()))
        # one sample has no spread to measure: take its term as all noise (and stay JSON-finite)
        errors.append(float(values.std(correction=1) / math.sqrt(len(values))) if len(values) > 1 else means[-1])
    return FisherTerms(
        labels=labels,
        loss_changes=tuple(means),
        standard_errors=tuple(errors),
        layer_names=tuple(layer.name for layer in layers),
        fisher_traces=tuple(float(total) / count for total in fisher_sums),
        num_samples=count,
    )

"""The calibration loss L(W) whose gradient and Hessian measure sensitivity.

L is the mean over the whole calibration set of a per-sample loss:

- ``cross_entropy`` with labels, when the calibration data has a ``labels`` array;
- otherwise **self-distillation** against the full-precision model W₀, picked by what the model
  outputs (``sensitivity.outputs``: the producing op and the float values):

  ================================  =============================  =====================================
  the output (one output)           loss kind                      per sample
  ================================  =============================  =====================================
  class scores as logits [B, C]     ``distill_cross_entropy``      CE to the float argmax (class axis 1)
  logits per step [B, T, C]         ``distill_step_cross_entropy`` CE to the float argmax over C, mean
                                                                   over the steps
  probabilities (Softmax) [B, C] or ``distill_kl``                 KL(p₀ ‖ p) over the last axis, mean
  [B, T, C]                                                        over the steps
  log-probabilities (LogSoftmax)    ``distill_kl_log_probs``       the same KL, read from log p
  independent probabilities         ``distill_binary_kl``          Σ over the last axis of the
  (Sigmoid) [B, C] or [B, T, C]                                    Bernoulli KL(p₀ ‖ p), mean over steps
  embeddings, dense maps, [B, 1]    ``distill_mse``                mean (f(W) − f(W₀))²
  ================================  =============================  =====================================

  Several outputs: ``distill_normalized_mse``, Σₖ mean (fₖ(W) − fₖ(W₀))² / msₖ, each output's squared
  error divided by its float mean square msₖ over the calibration set (the term is 1/SQNRₖ), so an
  output in pixels does not drown one in probabilities. ``task="classification"`` forces
  ``distill_cross_entropy`` and ``task="regression"`` ``distill_mse`` (summed over the outputs,
  unscaled), whatever the outputs are.

The KL and MSE kinds are 0 at W₀ with a zero gradient there, and their Hessian at W₀ is positive
semi-definite. For the MSE kinds the residual r = f(W) − f(W₀) is zero, so
∇²L = (2/m)·Σ (JᵀJ + Σₖ rₖ ∇²fₖ) reduces to the Gauss-Newton matrix (2/m)·JᵀJ. For the KL kinds
the gradient −Σ p₀ ∇log p = −∇Σp is 0 at p = p₀, and the Hessian is the Fisher matrix
(1/m)·Σ Jᵀ diag(p₀) J with J the Jacobian of log p (per Bernoulli output: Jᵀ diag(1/(p₀(1−p₀))) J
with J that of p). Probabilities are read as log(max(p, PROBABILITY_FLOOR)), renormalised over the
last axis with a log-softmax, so the KL is computed stably and its gradient at W₀ vanishes even
where the rows sum to 1 only approximately. (The cross-entropy kinds are not 0 at W₀: the float
model is not certain of its own argmax, so their gradient is small but not zero.)

The set is processed in mini-batches of at most ``batch_size`` samples (the batch size
bounds memory). Because every batch loss is a mean, the full loss is the weighted sum
L = Σ_b (n_b / N)·L_b, and so are its gradient and Hessian-vector products.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from sensitivity.normalize import padded_rows
from sensitivity.outputs import KIND_SAMPLES, program_output_kind
from sensitivity.program import Program
from sensitivity.samples import sample_count, take_samples

LABELS = "labels"
TASKS = ("auto", "classification", "regression")
LOSS_KINDS = (
    "cross_entropy",
    "distill_cross_entropy",
    "distill_mse",
    "distill_step_cross_entropy",
    "distill_kl",
    "distill_kl_log_probs",
    "distill_binary_kl",
    "distill_normalized_mse",
)
# Probabilities are read as log(max(p, floor)): finite where a float32 softmax underflows to 0, and
# the same in float32, float64 and the planner's numpy mirror (planner.activation).
PROBABILITY_FLOOR = 1e-30
# (output kind, score form) of a single output -> its self-distillation loss
_DISTILL_KINDS = {
    ("class_scores", "logits"): "distill_cross_entropy",
    ("sequence", "logits"): "distill_step_cross_entropy",
    ("class_scores", "probabilities"): "distill_kl",
    ("sequence", "probabilities"): "distill_kl",
    ("class_scores", "log_probabilities"): "distill_kl_log_probs",
    ("sequence", "log_probabilities"): "distill_kl_log_probs",
    ("class_scores", "binary_probabilities"): "distill_binary_kl",
    ("sequence", "binary_probabilities"): "distill_binary_kl",
}


@dataclass(frozen=True)
class Batch:
    inputs: dict[str, torch.Tensor]
    targets: tuple[torch.Tensor, ...]  # class indices, float outputs or their log-probabilities (one per output)
    weight: float  # n_b / N
    valid: int | None = None  # real samples when the rest pad a fixed-size batch (see CalibrationLoss)


@dataclass(frozen=True)
class _FloatBatch:
    """A batch while the loss is built: its inputs, the float model's outputs and its labels."""

    inputs: dict[str, torch.Tensor]
    outputs: tuple[torch.Tensor, ...]
    labels: np.ndarray | None
    weight: float
    valid: int | None
    rows: int  # samples the model ran on, padding included


def _check_labels(labels: torch.Tensor, logits: torch.Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"labels need a single output of shape [batch, classes]; got {tuple(logits.shape)}")
    low, high, classes = int(labels.min()), int(labels.max()), logits.shape[1]
    if low < 0 or high >= classes:
        raise ValueError(
            f"labels must lie in [0, {classes - 1}] (the model has {classes} classes); got [{low}, {high}]"
        )


class CalibrationLoss:
    """Mini-batched calibration loss of a program; see the module docstring for the maths.

    ``calibration`` maps each of ``program.input_names`` (and optionally ``labels``) to an
    array with samples on the input's ``program.sample_axes`` axis (labels: axis 0; a shared input,
    axis None, goes whole to every batch). The full-precision targets needed by
    self-distillation are computed once, here. ``kind`` is one of ``LOSS_KINDS`` and ``reason``
    says why; ``output_scales`` are the factors of ``distill_normalized_mse`` (1 for the others).
    """

    def __init__(
        self,
        program: Program,
        calibration: Mapping[str, np.ndarray],
        batch_size: int,
        device: torch.device,
        task: str = "auto",
    ) -> None:
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}; got {task!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1; got {batch_size}")
        self.program = program
        self.device = torch.device(device)
        self.weights0 = {name: w.to(self.device) for name, w in program.layer_weights.items()}
        axes = program.sample_axes
        inputs_only = {name: calibration[name] for name in program.input_names}
        total = sample_count(inputs_only, axes, what="calibration set")
        self.num_samples = total
        fixed = program.fixed_batch_size
        batch_size = fixed or batch_size  # a model exported with batch N runs on exactly N samples
        labels = calibration.get(LABELS)
        pending: list[_FloatBatch] = []
        for start in range(0, total, batch_size):
            stop = min(start + batch_size, total)
            rows = padded_rows(start, stop, fixed)
            inputs = {name: self._tensor(array) for name, array in take_samples(inputs_only, rows, axes).items()}
            with torch.no_grad():
                outputs = tuple(out.detach() for out in program.forward(self.weights0, inputs))
            valid = stop - start if fixed is not None and stop - start < fixed else None
            pending.append(
                _FloatBatch(
                    inputs,
                    outputs,
                    None if labels is None else labels[rows],
                    (stop - start) / total,
                    valid,
                    fixed or stop - start,
                )
            )
        # The kind is read from the float outputs of the whole set, before any target is made.
        self.kind, self.reason = self._choose_kind(pending, labels is not None, task)
        self.output_axes = _output_axes(pending)
        self.output_scales = self._output_scales(pending)
        self.batches = []
        pending.reverse()
        while pending:  # each batch's float outputs go once its targets are made
            item = pending.pop()
            self.batches.append(Batch(item.inputs, self._targets(item.outputs, item.labels), item.weight, item.valid))

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        """A calibration slice on the device; floating data takes the layer weights' dtype
        (float64 arrays from numpy would not run through a float32 model)."""
        # np.ascontiguousarray would make a shared rank-0 input (a sample rate) 1-d
        tensor = torch.from_numpy(np.asarray(array, order="C")).to(self.device)
        if tensor.is_floating_point():
            tensor = tensor.to(next(iter(self.weights0.values())).dtype)
        return tensor

    def _choose_kind(self, pending: Sequence[_FloatBatch], has_labels: bool, task: str) -> tuple[str, str]:
        """The loss kind, and why (see the module docstring)."""
        if has_labels:
            return "cross_entropy", "labels given: cross-entropy with them"
        if task == "classification":
            return "distill_cross_entropy", "task='classification': cross-entropy to the float model's argmax"
        if task == "regression":
            return "distill_mse", "task='regression': mean squared error to the float outputs"
        count = len(pending[0].outputs)
        if count > 1:
            return "distill_normalized_mse", (
                f"{count} outputs: each output's mean squared error to the float model's, divided by the float "
                "output's mean square → distill_normalized_mse"
            )
        found = program_output_kind(self.program, 0, _first_samples([item.outputs[0] for item in pending]))
        kind = _DISTILL_KINDS.get((found.kind, found.form), "distill_mse")
        return kind, f"{found.reason} → {kind}"

    def _output_scales(self, pending: Sequence[_FloatBatch]) -> tuple[float, ...]:
        """1 / (each output's float mean square over the calibration set) for ``distill_normalized_mse``;
        an output that is 0 throughout keeps the factor 1 (there is no scale to divide by)."""
        count = len(pending[0].outputs)
        if self.kind != "distill_normalized_mse":
            return (1.0,) * count
        squares = [
            sum(
                item.weight * float(_real_rows(item.outputs[k], item.valid, self.output_axes[k]).double().pow(2).mean())
                for item in pending
            )
            for k in range(count)
        ]
        return tuple(1.0 / square if square > 0.0 else 1.0 for square in squares)

    def _targets(self, outputs: tuple[torch.Tensor, ...], labels: np.ndarray | None) -> tuple[torch.Tensor, ...]:
        if self.kind == "cross_entropy":
            target = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(self.device)
            _check_labels(target, outputs[0])
            return (target,)
        return loss_targets(self.kind, outputs)

    def batch_loss(self, weights: Mapping[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        """Mean loss over one batch (differentiable in ``weights``). Not ``sample_losses().mean()``:
        this also takes outputs whose first axis is not the sample axis."""
        if batch.valid is not None:  # padding must not count: the mean of the real samples' losses
            return self.sample_losses(weights, batch).mean()
        outputs = self.program.forward(weights, batch.inputs)
        positions = position_losses(self.kind, outputs, batch.targets, self.output_scales)
        return functools.reduce(operator.add, (losses.mean() for losses in positions))

    def sample_losses(self, weights: Mapping[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        """Each sample's loss in one batch, shape [n_b], each output's positions grouped along its
        sample axis (``output_axes``); their mean is ``batch_loss``."""
        outputs = self.program.forward(weights, batch.inputs)
        losses = per_sample(position_losses(self.kind, outputs, batch.targets, self.output_scales), self.output_axes)
        return losses if batch.valid is None else losses[: batch.valid]

    def value(self, weights: Mapping[str, torch.Tensor] | None = None) -> float:
        """L(W) over the whole set (W₀ when ``weights`` is None), without gradients."""
        weights = self.weights0 if weights is None else weights
        with torch.no_grad():
            return float(sum(b.weight * self.batch_loss(weights, b).double() for b in self.batches))


def loss_targets(kind: str, outputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """What a self-distillation loss of ``kind`` compares with, from the float outputs: the argmax
    (over axis 1, or the last axis per step), the renormalised log-probabilities, or the outputs."""
    if kind == "distill_cross_entropy":
        return (outputs[0].argmax(dim=1),)
    if kind == "distill_step_cross_entropy":
        return (outputs[0].argmax(dim=-1),)
    if kind in ("distill_kl", "distill_kl_log_probs"):
        return (_log_distribution(kind, outputs[0]),)
    return tuple(outputs)


def position_losses(
    kind: str, outputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], scales: Sequence[float]
) -> list[torch.Tensor]:
    """Per output, the loss of ``kind`` at every position (sample, step, element): its mean over the
    positions is the output's term of the batch loss, its mean per sample the sample's (``per_sample``).
    ``scales`` multiply each output's squared error (``distill_normalized_mse``; 1 otherwise)."""
    if kind in ("cross_entropy", "distill_cross_entropy"):
        return [F.cross_entropy(outputs[0], targets[0], reduction="none")]
    if kind == "distill_step_cross_entropy":
        return [F.cross_entropy(outputs[0].movedim(-1, 1), targets[0], reduction="none")]
    if kind in ("distill_kl", "distill_kl_log_probs"):
        log_p0 = targets[0]
        return [(log_p0.exp() * (log_p0 - _log_distribution(kind, outputs[0]))).sum(dim=-1)]
    if kind == "distill_binary_kl":
        return [_binary_kl(targets[0], outputs[0]).sum(dim=-1)]
    return [
        _squared_error(out, target) * scale if scale != 1.0 else _squared_error(out, target)
        for out, target, scale in zip(outputs, targets, scales)
    ]


def per_sample(positions: Sequence[torch.Tensor], axes: Sequence[int | None] | None = None) -> torch.Tensor:
    """Each sample's loss, [n]: the mean of every output's positions of that sample, summed over
    outputs; ``axes`` gives each output's sample axis (default 0; None: no axis follows the samples,
    and each sample gets the output's mean). An output's positions keep its sample axis (a loss
    only reduces the last, class axis)."""
    axes = (0,) * len(positions) if axes is None else axes
    count = next(position.shape[axis] for position, axis in zip(positions, axes) if axis is not None)
    means = (_sample_means(position, axis, count) for position, axis in zip(positions, axes))
    return functools.reduce(operator.add, means)


def _sample_means(position: torch.Tensor, axis: int | None, count: int) -> torch.Tensor:
    if axis is None:
        return position.mean().expand(count)
    return position.movedim(axis, 0).reshape(count, -1).mean(dim=1)


def _output_axes(pending: Sequence[_FloatBatch]) -> tuple[int | None, ...]:
    """Each output's sample axis: the first axis whose size is the batch's sample count in every
    batch (time-major CTC scores [T, n, C], silero's next state [2, n, 128]); None when none is.
    With one batch size a tie goes to the first such axis (silero's state at n = 2 reads axis 0:
    its per-sample split is then wrong, its mean over the batch is not)."""
    axes = []
    for k, output in enumerate(pending[0].outputs):
        fits = [
            axis for axis in range(output.dim()) if all(item.outputs[k].shape[axis] == item.rows for item in pending)
        ]
        axes.append(fits[0] if fits else None)
    return tuple(axes)


def _first_samples(outputs: Sequence[torch.Tensor]) -> np.ndarray:
    """The first ``KIND_SAMPLES`` rows of an output over the batches, as numpy (for the value rules)."""
    parts, count = [], 0
    for out in outputs:
        parts.append(out.detach().cpu().numpy())
        count += len(out) if out.dim() else 1
        if count >= KIND_SAMPLES:
            break
    return np.concatenate(parts) if parts[0].ndim else parts[0]


def _real_rows(out: torch.Tensor, valid: int | None, axis: int | None) -> torch.Tensor:
    return out if valid is None or axis is None else out.narrow(axis, 0, valid)


def _log_distribution(kind: str, out: torch.Tensor) -> torch.Tensor:
    """log p over the last axis, renormalised: from probabilities as log(max(p, floor)), from
    log-probabilities as they are. The log-softmax makes Σp = 1 exactly, so the KL's gradient at W₀,
    −Σ ∂p, is 0 even where the model's rows sum to 1 only approximately."""
    log_p = out if kind == "distill_kl_log_probs" else out.clamp(min=PROBABILITY_FLOOR).log()
    return torch.log_softmax(log_p, dim=-1)


def _binary_kl(p0: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Elementwise Bernoulli KL(p₀ ‖ p) = p₀ log(p₀/p) + (1−p₀) log((1−p₀)/(1−p)), logs floored."""

    def log(x: torch.Tensor) -> torch.Tensor:
        return x.clamp(min=PROBABILITY_FLOOR).log()

    return p0 * (log(p0) - log(p)) + (1 - p0) * (log(1 - p0) - log(1 - p))


def _squared_error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(out - target)², written out: F.mse_loss fails under forward-over-reverse HVPs in torch 2.13
    ("ZeroTensors are immutable" from its jvp through the detached target)."""
    return (out - target) ** 2

"""The calibration loss L(W) whose gradient and Hessian measure sensitivity.

L is the mean over the whole calibration set of a per-sample loss:

- **cross-entropy with labels** when the calibration data has a ``labels`` array;
- otherwise **self-distillation** against the full-precision model W₀:
  - classifiers (a single output of rank 2 with more than one column, or
    ``task="classification"``): cross-entropy to the float model's argmax;
  - anything else: mean squared error to the float model's outputs,
    L(W) = mean ‖f(W, x) − f(W₀, x)‖².

At W = W₀ the MSE residual r = f(W) − f(W₀) is zero, so its Hessian
∇²L = (2/m)·Σ (JᵀJ + Σₖ rₖ ∇²fₖ) reduces to the Gauss-Newton matrix (2/m)·JᵀJ:
positive semi-definite, and the gradient is exactly zero (the first-order term
g·Δ of the predicted loss change vanishes).

The set is processed in mini-batches of at most ``batch_size`` samples (the batch size
bounds memory). Because every batch loss is a mean, the full loss is the weighted sum
L = Σ_b (n_b / N)·L_b, and so are its gradient and Hessian-vector products.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from sensitivity.normalize import padded_rows
from sensitivity.program import Program

LABELS = "labels"
TASKS = ("auto", "classification", "regression")
LOSS_KINDS = ("cross_entropy", "distill_cross_entropy", "distill_mse")


@dataclass(frozen=True)
class Batch:
    inputs: dict[str, torch.Tensor]
    targets: tuple[torch.Tensor, ...]  # class indices (one tensor) or float outputs (one per output)
    weight: float  # n_b / N
    valid: int | None = None  # real samples when the rest pad a fixed-size batch (see CalibrationLoss)


def _is_classifier(outputs: Sequence[torch.Tensor], task: str) -> bool:
    if task == "classification":
        return True
    if task == "regression":
        return False
    return len(outputs) == 1 and outputs[0].dim() == 2 and outputs[0].shape[1] > 1


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
    array whose first axis is the sample axis. The full-precision targets needed by
    self-distillation are computed once, here.
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
        total = len(next(iter(calibration.values())))
        self.num_samples = total
        self.batches: list[Batch] = []
        self.kind = ""
        fixed = program.fixed_batch_size
        batch_size = fixed or batch_size  # a model exported with batch N runs on exactly N samples
        for start in range(0, total, batch_size):
            stop = min(start + batch_size, total)
            rows = padded_rows(start, stop, fixed)
            inputs = {name: self._tensor(calibration[name][rows]) for name in program.input_names}
            labels = calibration.get(LABELS)
            targets = self._targets(inputs, None if labels is None else labels[rows], task)
            valid = stop - start if fixed is not None and stop - start < fixed else None
            self.batches.append(Batch(inputs, targets, (stop - start) / total, valid))

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        """A calibration slice on the device; floating data takes the layer weights' dtype
        (float64 arrays from numpy would not run through a float32 model)."""
        tensor = torch.from_numpy(np.ascontiguousarray(array)).to(self.device)
        if tensor.is_floating_point():
            tensor = tensor.to(next(iter(self.weights0.values())).dtype)
        return tensor

    def _targets(
        self, inputs: dict[str, torch.Tensor], labels: np.ndarray | None, task: str
    ) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            outputs = self.program.forward(self.weights0, inputs)
        if labels is not None:
            self.kind = "cross_entropy"
            target = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(self.device)
            _check_labels(target, outputs[0])
            return (target,)
        if _is_classifier(outputs, task):
            self.kind = "distill_cross_entropy"
            return (outputs[0].argmax(dim=1),)
        self.kind = "distill_mse"
        return tuple(out.detach() for out in outputs)

    def batch_loss(self, weights: Mapping[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        """Mean loss over one batch (differentiable in ``weights``). Not ``sample_losses().mean()``:
        this also takes outputs whose first axis is not the sample axis."""
        if batch.valid is not None:  # padding must not count: the mean of the real samples' losses
            return self.sample_losses(weights, batch).mean()
        outputs = self.program.forward(weights, batch.inputs)
        if self.kind == "distill_mse":
            return sum(_squared_error(out, target).mean() for out, target in zip(outputs, batch.targets))
        return F.cross_entropy(outputs[0], batch.targets[0])

    def sample_losses(self, weights: Mapping[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        """Each sample's loss in one batch, shape [n_b], for outputs with the sample axis first;
        their mean is ``batch_loss``."""
        outputs = self.program.forward(weights, batch.inputs)
        if self.kind == "distill_mse":
            losses = sum(
                _squared_error(out, target).reshape(out.shape[0], -1).mean(dim=1)  # [batch] outputs too
                for out, target in zip(outputs, batch.targets)
            )
        else:
            losses = F.cross_entropy(outputs[0], batch.targets[0], reduction="none")
        return losses if batch.valid is None else losses[: batch.valid]

    def value(self, weights: Mapping[str, torch.Tensor] | None = None) -> float:
        """L(W) over the whole set (W₀ when ``weights`` is None), without gradients."""
        weights = self.weights0 if weights is None else weights
        with torch.no_grad():
            return float(sum(b.weight * self.batch_loss(weights, b).double() for b in self.batches))


def _squared_error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(out - target)², written out: F.mse_loss fails under forward-over-reverse HVPs in torch 2.13
    ("ZeroTensors are immutable" from its jvp through the detached target)."""
    return (out - target) ** 2


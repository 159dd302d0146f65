"""The calibration loss: kinds, mini-batch weighting, Gauss-Newton at the float point."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sensitivity.hvp import HessianVectorProducts
from sensitivity.losses import CalibrationLoss
from sensitivity.torch_program import TorchProgram
from tests.sensitivity.test_hvp import CPU, TinyNet, single_thread, tiny_problem  # noqa: F401


def test_labels_give_cross_entropy_over_the_whole_set_for_any_batch_size() -> None:
    problem = tiny_problem(labels=True, samples=23)
    expected = float(problem.exact_loss(problem.point()))
    for batch_size in (1, 5, 23, 100):
        loss = problem.loss(batch_size=batch_size)
        assert loss.kind == "cross_entropy"
        assert loss.value() == pytest.approx(expected, rel=1e-12)
    assert len(problem.loss(batch_size=5).batches) == 5
    assert sum(b.weight for b in problem.loss(batch_size=5).batches) == pytest.approx(1.0)


def test_classifier_without_labels_distills_to_the_float_argmax() -> None:
    problem = tiny_problem(labels=False)
    loss = problem.loss(batch_size=10)
    assert loss.kind == "distill_cross_entropy"
    logits = problem.module(torch.from_numpy(problem.calibration["input"])).detach()
    assert loss.value() == pytest.approx(float(F.cross_entropy(logits, logits.argmax(1))), rel=1e-12)


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 4)
        self.head_a = nn.Linear(4, 2)
        self.head_b = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.body(x))
        return self.head_a(h), self.head_b(h)


def _regression_loss(batch_size: int = 4) -> CalibrationLoss:
    torch.manual_seed(0)
    program = TorchProgram(TwoHeads().double(), output_names=("a", "b"))
    calibration = {"input": np.random.default_rng(0).normal(size=(10, 3))}
    return CalibrationLoss(program, calibration, batch_size, CPU)


def test_mse_hessian_at_the_float_point_is_gauss_newton() -> None:
    loss = _regression_loss()
    assert loss.kind == "distill_mse"
    assert loss.value() == 0.0
    value, gradient = HessianVectorProducts(loss).gradient()
    assert value == 0.0 and all(float(g.abs().max()) == 0.0 for g in gradient)

    names = [layer.name for layer in loss.program.layers]
    sizes = [layer.num_params for layer in loss.program.layers]
    shapes = [layer.shape for layer in loss.program.layers]
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(10, 3)))

    def outputs(flat: torch.Tensor) -> torch.Tensor:
        weights = {n: p.reshape(s) for n, p, s in zip(names, torch.split(flat, sizes), shapes)}
        return torch.cat([out.reshape(-1) for out in loss.program.forward(weights, {"input": x})])

    point = torch.cat([loss.weights0[n].reshape(-1) for n in names])
    jacobian = torch.autograd.functional.jacobian(outputs, point)
    # L = Σ_outputs mean (y − y₀)²: output a has 10·2 elements, b has 10·1.
    scale = torch.cat([torch.full((20,), 2.0 / 20), torch.full((10,), 2.0 / 10)])
    gauss_newton = jacobian.T @ (scale[:, None] * jacobian)
    hvp = HessianVectorProducts(loss)
    columns = hvp.many([tuple(t.reshape(s) for t, s in zip(torch.split(e, sizes), shapes)) for e in torch.eye(len(point), dtype=torch.float64)])
    hessian = torch.stack([torch.cat([h.reshape(-1) for h in column]) for column in columns], dim=1)
    assert float((hessian - gauss_newton).abs().max()) < 1e-6 * float(gauss_newton.abs().max()), float((hessian - gauss_newton).abs().max())
    assert float(torch.linalg.eigvalsh(hessian).min()) > -1e-12  # positive semi-definite


def test_task_overrides_the_classifier_heuristic() -> None:
    problem = tiny_problem(labels=False)
    loss = CalibrationLoss(problem.program, problem.calibration, 8, CPU, task="regression")
    assert loss.kind == "distill_mse"


def test_labels_out_of_range_are_rejected() -> None:
    problem = tiny_problem()
    bad = {**problem.calibration, "labels": np.full(len(problem.calibration["labels"]), 4)}
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\] \(the model has 4 classes\)"):
        CalibrationLoss(problem.program, bad, 8, CPU)


def test_bad_settings_are_rejected() -> None:
    problem = tiny_problem()
    with pytest.raises(ValueError, match="task must be one of"):
        CalibrationLoss(problem.program, problem.calibration, 8, CPU, task="segmentation")
    with pytest.raises(ValueError, match="batch_size"):
        CalibrationLoss(problem.program, problem.calibration, 0, CPU)


def test_float64_inputs_run_through_a_float32_model() -> None:
    torch.manual_seed(0)
    program = TorchProgram(TinyNet().eval())
    calibration = {"input": np.random.default_rng(0).normal(size=(6, 1, 4, 4)), "labels": np.arange(6) % 4}
    loss = CalibrationLoss(program, calibration, 4, CPU)
    assert loss.batches[0].inputs["input"].dtype == torch.float32
    expected = F.cross_entropy(program.module(torch.from_numpy(calibration["input"]).float()), torch.arange(6) % 4)
    assert loss.value() == pytest.approx(float(expected.detach()), rel=1e-6)


@pytest.mark.parametrize("kind", ["cross_entropy", "distill_cross_entropy", "distill_mse"])
def test_sample_losses_average_to_the_batch_loss(kind: str) -> None:
    problem = tiny_problem(labels=kind == "cross_entropy")
    task = "regression" if kind == "distill_mse" else "auto"
    loss = CalibrationLoss(problem.program, problem.calibration, 10, CPU, task=task)
    assert loss.kind == kind
    moved = {name: w + 0.05 for name, w in loss.weights0.items()}  # away from the float point: nonzero losses
    for batch in loss.batches:
        samples = loss.sample_losses(moved, batch)
        assert samples.shape == (len(next(iter(batch.inputs.values()))),)
        assert float(samples.min()) >= 0 and float(samples.std()) > 0
        assert float(samples.mean()) == pytest.approx(float(loss.batch_loss(moved, batch)), rel=1e-12)

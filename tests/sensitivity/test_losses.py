"""The calibration loss: kinds, mini-batch weighting, Gauss-Newton and Fisher at the float point."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sensitivity.examples import export_onnx, torchscript_export
from sensitivity.hvp import HVP_METHODS, HessianVectorProducts
from sensitivity.losses import LOSS_KINDS, CalibrationLoss
from sensitivity.onnx_program import load_onnx
from sensitivity.torch_program import TorchProgram
from tests.sensitivity.helpers import CPU, TinyNet, tiny_problem

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/sensitivity/conftest.py


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


def _two_output_loss(task: str = "auto", batch_size: int = 4) -> CalibrationLoss:
    torch.manual_seed(0)
    program = TorchProgram(TwoHeads().double(), output_names=("a", "b"))
    calibration = {"input": np.random.default_rng(0).normal(size=(10, 3))}
    return CalibrationLoss(program, calibration, batch_size, CPU, task=task)


@pytest.mark.parametrize("task", ["auto", "regression"])
def test_mse_hessian_at_the_float_point_is_gauss_newton(task: str) -> None:
    """Two outputs: the automatic loss divides each output's squared error by its float mean square,
    ``task="regression"`` sums them as they are; both are Gauss-Newton at W₀."""
    loss = _two_output_loss(task)
    assert loss.kind == ("distill_normalized_mse" if task == "auto" else "distill_mse")
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
    a0, b0 = loss.program.forward(loss.weights0, {"input": x})
    # L = Σ_outputs mean (y − y₀)² / ms: output a has 10·2 elements, b has 10·1; ms = 1 for regression.
    ms_a, ms_b = (float(a0.pow(2).mean()), float(b0.pow(2).mean())) if task == "auto" else (1.0, 1.0)
    assert loss.output_scales == pytest.approx((1 / ms_a, 1 / ms_b), rel=1e-12)
    jacobian = torch.autograd.functional.jacobian(outputs, point)
    scale = torch.cat([torch.full((20,), 2.0 / 20 / ms_a), torch.full((10,), 2.0 / 10 / ms_b)]).double()
    gauss_newton = jacobian.T @ (scale[:, None] * jacobian)
    hvp = HessianVectorProducts(loss)
    columns = hvp.many(
        [
            tuple(t.reshape(s) for t, s in zip(torch.split(e, sizes), shapes))
            for e in torch.eye(len(point), dtype=torch.float64)
        ]
    )
    hessian = torch.stack([torch.cat([h.reshape(-1) for h in column]) for column in columns], dim=1)
    assert float((hessian - gauss_newton).abs().max()) < 1e-6 * float(gauss_newton.abs().max()), float(
        (hessian - gauss_newton).abs().max()
    )
    assert float(torch.linalg.eigvalsh(hessian).min()) > -1e-12  # positive semi-definite


def test_task_overrides_the_classifier_heuristic() -> None:
    problem = tiny_problem(labels=False)
    loss = CalibrationLoss(problem.program, problem.calibration, 8, CPU, task="regression")
    assert loss.kind == "distill_mse" and "task='regression'" in loss.reason
    program, x = _onnx_head(_softmax)  # would be distill_kl; the old argmax cross-entropy on request
    loss = CalibrationLoss(program, {"input": x}, 8, CPU, task="classification")
    assert loss.kind == "distill_cross_entropy"
    logits = program.forward(program.layer_weights, {"input": torch.from_numpy(x)})[0]
    assert loss.value() == pytest.approx(float(F.cross_entropy(logits, logits.argmax(1))), rel=1e-6)


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


# --- the loss follows the output's kind -------------------------------------------------------------


class Head(nn.Module):
    """Linear - tanh - Linear to [B, width] (or [B, steps, width]), then ``end``."""

    def __init__(self, end, steps: int = 0, width: int = 5) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, width * max(steps, 1))
        self.end, self.steps, self.width = end, steps, width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc2(torch.tanh(self.fc1(x)))
        return self.end(y.reshape(x.shape[0], self.steps, self.width) if self.steps else y)


def _logits(y: torch.Tensor) -> torch.Tensor:
    return y


def _softmax(y: torch.Tensor) -> torch.Tensor:
    return F.softmax(y, dim=-1)


def _log_softmax(y: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(y, dim=-1)


def _normalize(y: torch.Tensor) -> torch.Tensor:
    return F.normalize(y, dim=-1)


def _onnx_head(end, steps: int = 0, samples: int = 12, fixed: int | None = None, width: int = 5):
    """The head exported to ONNX (TorchScript exporter) and loaded by the interpreter, with inputs;
    ``fixed``: exported with that static batch size instead of a dynamic one."""
    torch.manual_seed(3)
    module = Head(end, steps, width).eval()
    if fixed is None:
        proto = export_onnx(module, torch.zeros(2, 6))
    else:
        import onnx

        exported = torchscript_export(
            module, (torch.zeros(fixed, 6),), input_names=["input"], output_names=["logits"], opset_version=17
        )
        proto = onnx.load_from_string(exported)
    x = np.random.default_rng(4).normal(size=(samples, 6)).astype(np.float32)
    return load_onnx(proto), x


def _log_softmax_np(z: np.ndarray) -> np.ndarray:
    shifted = z - z.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _reference(kind: str, y0: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Each sample's loss, written out in numpy (float64) from the float and moved outputs."""
    y0, y = y0.astype(np.float64), y.astype(np.float64)
    if kind in ("distill_cross_entropy", "distill_step_cross_entropy"):
        target = y0.argmax(axis=-1)
        positions = -np.take_along_axis(_log_softmax_np(y), target[..., None], axis=-1)[..., 0]
    elif kind == "distill_kl":
        positions = np.sum(y0 * np.log(y0 / y), axis=-1)
    elif kind == "distill_kl_log_probs":
        positions = np.sum(np.exp(y0) * (y0 - y), axis=-1)
    elif kind == "distill_binary_kl":
        positions = np.sum(y0 * np.log(y0 / y) + (1 - y0) * np.log((1 - y0) / (1 - y)), axis=-1)
    else:
        positions = (y - y0) ** 2
    return positions.reshape(len(positions), -1).mean(axis=1)


KIND_CASES = {  # name: (end, steps, the loss kind it must get)
    "logits classifier": (_logits, 0, "distill_cross_entropy"),
    "softmax classifier": (_softmax, 0, "distill_kl"),
    "log-softmax classifier": (_log_softmax, 0, "distill_kl_log_probs"),
    "sigmoid multi-label": (torch.sigmoid, 0, "distill_binary_kl"),
    "softmax sequence": (_softmax, 4, "distill_kl"),
    "logits sequence": (_logits, 4, "distill_step_cross_entropy"),
    "L2-normalised embedding": (_normalize, 0, "distill_mse"),
}


def _moved(weights: dict[str, torch.Tensor], scale: float = 0.1, seed: int = 5) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: w + scale * torch.randn(w.shape, generator=generator, dtype=w.dtype) for name, w in weights.items()}


@pytest.mark.parametrize("case", sorted(KIND_CASES))
def test_each_output_kind_gets_its_loss_with_the_written_out_value(case: str) -> None:
    end, steps, kind = KIND_CASES[case]
    program, x = _onnx_head(end, steps)
    loss = CalibrationLoss(program, {"input": x}, 5, CPU)  # batches of 5, 5 and 2
    assert loss.kind == kind, loss.reason
    moved = _moved(loss.weights0)
    inputs = {"input": torch.from_numpy(x)}
    y0 = program.forward(loss.weights0, inputs)[0].detach().numpy()
    y = program.forward(moved, inputs)[0].detach().numpy()
    expected = _reference(kind, y0, y)
    assert float(expected.std()) > 0
    samples = torch.cat([loss.sample_losses(moved, batch) for batch in loss.batches]).detach().numpy()
    np.testing.assert_allclose(samples, expected, rtol=1e-4, atol=1e-7)
    assert loss.value(moved) == pytest.approx(float(expected.mean()), rel=1e-5)
    for batch in loss.batches:
        assert float(loss.sample_losses(moved, batch).mean()) == pytest.approx(
            float(loss.batch_loss(moved, batch)), rel=1e-6
        )


@pytest.mark.parametrize(
    "case", ["softmax classifier", "log-softmax classifier", "sigmoid multi-label", "softmax sequence"]
)
def test_kl_losses_are_zero_with_zero_gradient_at_the_float_weights(case: str) -> None:
    end, steps, kind = KIND_CASES[case]
    program, x = _onnx_head(end, steps)
    loss = CalibrationLoss(program, {"input": x}, 5, CPU)
    assert loss.kind == kind
    value, gradient = HessianVectorProducts(loss).gradient()
    assert loss.value() < 1e-6 and value < 1e-6
    assert max(float(g.abs().max()) for g in gradient) < 1e-6


@pytest.mark.parametrize("case", sorted(KIND_CASES))
def test_both_hvp_methods_agree_for_every_kind(case: str) -> None:
    """Forward-over-reverse (jvp of grad) runs through every loss's ops: log_softmax, clamp, log,
    cross_entropy over a moved axis."""
    end, steps, _ = KIND_CASES[case]
    program, x = _onnx_head(end, steps)
    loss = CalibrationLoss(program, {"input": x}, 5, CPU)
    generator = torch.Generator().manual_seed(6)
    probe = [tuple(torch.randn(w.shape, generator=generator) for w in loss.weights0.values())]
    products = [HessianVectorProducts(loss, method=method).many(probe)[0] for method in HVP_METHODS]
    for a, b in zip(*products):
        assert float((a - b).norm()) <= 1e-4 * float(b.norm()) + 1e-9
    assert sum(float((h * v).sum()) for h, v in zip(products[0], probe[0])) > 0  # vᵀHv of a PSD (or CE) Hessian


@pytest.mark.parametrize("case", ["softmax sequence", "logits sequence", "sigmoid multi-label"])
def test_padding_of_a_fixed_batch_does_not_count(case: str) -> None:
    end, steps, kind = KIND_CASES[case]
    program, x = _onnx_head(end, steps, samples=10, fixed=4)
    assert program.fixed_batch_size == 4
    loss = CalibrationLoss(program, {"input": x}, 64, CPU)
    assert loss.kind == kind and [batch.valid for batch in loss.batches] == [None, None, 2]
    moved = _moved(loss.weights0)
    rows = [x[0:4], x[4:8], np.concatenate([x[8:10], x[8:10]])]
    y0 = np.concatenate([program.forward(loss.weights0, {"input": torch.from_numpy(r)})[0].numpy() for r in rows])
    y = np.concatenate([program.forward(moved, {"input": torch.from_numpy(r)})[0].detach().numpy() for r in rows])
    expected = _reference(kind, y0[:10], y[:10])
    assert loss.value(moved) == pytest.approx(float(expected.mean()), rel=1e-5)


class SoftmaxNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.fc2 = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.fc2(torch.tanh(self.fc1(x))), dim=1)


def test_kl_hessian_at_the_float_point_is_the_fisher_matrix() -> None:
    """∇²KL(p₀ ‖ p) at p = p₀ is (1/m) Σₛ Jₛᵀ diag(p₀ₛ) Jₛ with Jₛ the Jacobian of log pₛ: PSD. The module
    has no graph, so the probabilities are recognised from the values alone."""
    torch.manual_seed(0)
    program = TorchProgram(SoftmaxNet().double())
    x = np.random.default_rng(0).normal(size=(10, 3))
    loss = CalibrationLoss(program, {"input": x}, 4, CPU)
    assert loss.kind == "distill_kl" and "probabilities" in loss.reason
    names = [layer.name for layer in program.layers]
    sizes = [layer.num_params for layer in program.layers]
    shapes = [layer.shape for layer in program.layers]

    def log_p(flat: torch.Tensor) -> torch.Tensor:
        weights = {n: p.reshape(s) for n, p, s in zip(names, torch.split(flat, sizes), shapes)}
        return program.forward(weights, {"input": torch.from_numpy(x)})[0].log()

    point = torch.cat([loss.weights0[n].reshape(-1) for n in names])
    jacobian = torch.autograd.functional.jacobian(log_p, point)  # [samples, classes, weights]
    p0 = log_p(point).exp().detach()
    fisher = torch.einsum("sc,scw,scv->wv", p0, jacobian, jacobian) / len(x)
    columns = HessianVectorProducts(loss).many(
        [
            tuple(t.reshape(s) for t, s in zip(torch.split(e, sizes), shapes))
            for e in torch.eye(len(point), dtype=torch.float64)
        ]
    )
    hessian = torch.stack([torch.cat([h.reshape(-1) for h in column]) for column in columns], dim=1)
    assert float((hessian - fisher).abs().max()) < 1e-8 * float(fisher.abs().max())
    assert float(torch.linalg.eigvalsh(hessian).min()) > -1e-12


class TwoScales(nn.Module):
    """Two outputs from one body, one in units of 1 and one in units of 1000 (a detector's class
    probabilities beside its box pixels)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.small = nn.Linear(8, 3)
        self.large = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.body(x))
        return self.small(h), 1000.0 * self.large(h)


def _two_scales_program():
    import onnx

    torch.manual_seed(7)
    exported = torchscript_export(
        TwoScales().eval(),
        (torch.zeros(2, 6),),
        input_names=["input"],
        output_names=["scores", "boxes"],
        opset_version=17,
        dynamic_axes={"input": {0: "batch"}, "scores": {0: "batch"}, "boxes": {0: "batch"}},
    )
    return load_onnx(onnx.load_from_string(exported))


def test_several_outputs_are_each_divided_by_their_float_mean_square() -> None:
    """Unscaled, the 1000× output's squared error outweighs the other's ~10⁶-fold; divided by the float
    mean squares, each output's term at a relative weight perturbation is of the same order."""
    from sensitivity.losses import position_losses

    program = _two_scales_program()
    x = np.random.default_rng(8).normal(size=(16, 6)).astype(np.float32)
    loss = CalibrationLoss(program, {"input": x}, 6, CPU)
    plain = CalibrationLoss(program, {"input": x}, 6, CPU, task="regression")
    assert loss.kind == "distill_normalized_mse" and plain.kind == "distill_mse"
    y0 = [out.double() for out in program.forward(loss.weights0, {"input": torch.from_numpy(x)})]
    assert loss.output_scales == pytest.approx(tuple(1 / float(y.pow(2).mean()) for y in y0), rel=1e-5)
    generator = torch.Generator().manual_seed(9)
    moved = {name: w * (1 + 0.05 * torch.randn(w.shape, generator=generator)) for name, w in loss.weights0.items()}

    def terms(calibration_loss: CalibrationLoss) -> list[float]:
        totals = [0.0, 0.0]
        for batch in calibration_loss.batches:
            outputs = program.forward(moved, batch.inputs)
            parts = position_losses(calibration_loss.kind, outputs, batch.targets, calibration_loss.output_scales)
            totals = [t + batch.weight * float(p.mean()) for t, p in zip(totals, parts)]
        return totals

    scaled, unscaled = terms(loss), terms(plain)
    assert 0.1 < scaled[0] / scaled[1] < 10, scaled
    assert unscaled[1] / unscaled[0] > 1e4, unscaled
    assert loss.value(moved) == pytest.approx(sum(scaled), rel=1e-6)
    assert loss.value() == 0.0


def test_every_loss_kind_is_covered() -> None:
    covered = {kind for _, _, kind in KIND_CASES.values()} | {"cross_entropy", "distill_normalized_mse"}
    assert covered == set(LOSS_KINDS)

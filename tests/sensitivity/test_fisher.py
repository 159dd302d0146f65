"""The empirical Fisher signal against per-sample gradients computed one sample at a time, the exact
Hessian diagonal of a well-specified model, and its standard error's 1/√N."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sensitivity.fisher import fisher_terms, per_sample_gradients
from sensitivity.hvp import HessianVectorProducts
from sensitivity.interlayer import perturbations
from sensitivity.losses import CalibrationLoss
from sensitivity.results import FisherConfig, FisherTerms, SensitivityResult
from sensitivity.run import compute_sensitivity
from sensitivity.torch_program import TorchProgram
from tests.sensitivity.helpers import CPU, TinyProblem, tiny_problem

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/sensitivity/conftest.py

BITS = (8, 4, 2)


@pytest.fixture(scope="module")
def problem() -> TinyProblem:
    return tiny_problem(samples=24)


def _explicit_gradients(problem: TinyProblem) -> torch.Tensor:
    """[N, weights]: each sample's cross-entropy gradient, one autograd call per sample."""
    names = [layer.name for layer in problem.program.layers]
    rows = []
    for n in range(len(problem.calibration["input"])):
        flat = problem.point().clone().requires_grad_(True)
        weights = dict(zip(names, problem.unflatten(flat)))
        state = {**{k: v.detach() for k, v in problem.module.named_parameters()}, **weights}
        x = torch.from_numpy(problem.calibration["input"][n : n + 1])
        label = torch.from_numpy(problem.calibration["labels"][n : n + 1])
        loss = F.cross_entropy(torch.func.functional_call(problem.module, state, (x,)), label)
        rows.append(torch.autograd.grad(loss, flat)[0])
    return torch.stack(rows)


@pytest.mark.parametrize("rows_per_pass", [1, 4])  # one VJP at a time, and vmap-batched
def test_per_sample_gradients_match_one_sample_at_a_time(problem: TinyProblem, rows_per_pass: int) -> None:
    hvp = HessianVectorProducts(problem.loss(batch_size=7))
    chunks = [chunk for batch in hvp.loss.batches for chunk in per_sample_gradients(hvp, batch, rows_per_pass)]
    computed = torch.cat([torch.cat([g.flatten(1) for g in chunk], dim=1) for chunk in chunks])
    explicit = _explicit_gradients(problem)
    assert computed.shape == explicit.shape == (24, sum(problem.sizes))
    torch.testing.assert_close(computed, explicit, rtol=1e-10, atol=1e-12)


def test_fisher_terms_equal_the_brute_formula(problem: TinyProblem) -> None:
    hvp = HessianVectorProducts(problem.loss(batch_size=7))
    terms = fisher_terms(hvp, problem.program.layers, BITS, rows_per_pass=4)
    g = _explicit_gradients(problem)
    fisher = g.pow(2).mean(dim=0)  # Fᵢᵢ = (1/N) Σₙ gₙ,ᵢ²
    blocks = problem.blocks()
    assert terms.layer_names == tuple(layer.name for layer in problem.program.layers)
    assert terms.fisher_traces == pytest.approx([float(fisher[b].sum()) for b in blocks], rel=1e-10)
    deltas = perturbations(problem.program.layers, hvp.point, BITS)
    position = {layer.name: b for layer, b in zip(problem.program.layers, blocks)}
    assert terms.labels == tuple(deltas) and terms.num_samples == 24
    for (name, bits), change, error in zip(terms.labels, terms.loss_changes, terms.standard_errors):
        delta_squared = deltas[(name, bits)].flatten().pow(2)
        per_sample = 0.5 * (g[:, position[name]].pow(2) * delta_squared).sum(dim=1)
        assert change == pytest.approx(float(0.5 * (fisher[position[name]] * delta_squared).sum()), rel=1e-10)
        assert error == pytest.approx(float(per_sample.std(correction=1)) / 24**0.5, rel=1e-10)
        assert change > 0 and error > 0
    # coarser bits perturb more: every layer's predicted change grows from 8 to 2 bits
    for layer in problem.program.layers:
        changes = [terms.loss_change(layer.name, b) for b in BITS]
        assert changes == sorted(changes)


class Logistic(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def test_fisher_estimates_the_hessian_diagonal_of_a_well_specified_model() -> None:
    """Softmax regression with labels drawn from the model itself: E[gₙgₙᵀ] is the Hessian (the
    cross-entropy's Hessian does not depend on the labels), so ½ Σ Fᵢᵢ Δᵢ² estimates ½ Σ Hᵢᵢ Δᵢ²
    within its standard error."""
    torch.manual_seed(0)
    module = Logistic().double().eval()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, 5))
    with torch.no_grad():
        probabilities = torch.softmax(module(torch.from_numpy(x)), dim=1).numpy()
    labels = np.array([rng.choice(3, p=p / p.sum()) for p in probabilities])
    program = TorchProgram(module)
    loss = CalibrationLoss(program, {"input": x, "labels": labels}, 1000, CPU)
    hvp = HessianVectorProducts(loss)
    terms = fisher_terms(hvp, program.layers, BITS, rows_per_pass=8)
    weight = hvp.point[0].clone()

    def exact_loss(flat: torch.Tensor) -> torch.Tensor:
        logits = torch.from_numpy(x) @ flat.reshape(weight.shape).T
        return F.cross_entropy(logits, torch.from_numpy(labels))

    hessian_diagonal = torch.autograd.functional.hessian(exact_loss, weight.flatten()).diagonal()
    deltas = perturbations(program.layers, hvp.point, BITS)
    for label, change, error in zip(terms.labels, terms.loss_changes, terms.standard_errors):
        expected = float(0.5 * (hessian_diagonal * deltas[label].flatten().pow(2)).sum())
        assert abs(change - expected) < 4 * error, (label, change, expected, error)
        assert error < 0.1 * change  # 4000 samples pin it well


def test_standard_error_shrinks_as_one_over_root_n() -> None:
    errors = {}
    for samples in (96, 384):
        problem = tiny_problem(samples=samples, seed=3)
        hvp = HessianVectorProducts(problem.loss(batch_size=96))
        errors[samples] = np.array(fisher_terms(hvp, problem.program.layers, BITS, rows_per_pass=16).standard_errors)
    ratio = float(np.median(errors[96] / errors[384]))
    assert 1.5 < ratio < 2.7, ratio  # √4 = 2, up to the spread of the two samples' SDs


def test_compute_sensitivity_runs_fisher_and_round_trips(problem: TinyProblem) -> None:
    config = FisherConfig(bits=(8, 4), batch_size=10, device="cpu", memory_budget_mb=None)
    result = compute_sensitivity(problem.program, problem.calibration, config)
    assert result.fisher is not None and result.traces is None and result.num_hvps == 0
    assert len(result.fisher.labels) == 2 * len(problem.program.layers)
    assert "fisher" in result.timings
    again = SensitivityResult.from_dict(result.to_dict())
    assert again.fisher == result.fisher and again.config == config
    assert FisherTerms.from_dict(result.fisher.to_dict()) == result.fisher


def test_a_label_free_loss_at_its_minimum_is_refused(problem: TinyProblem) -> None:
    config = FisherConfig(device="cpu", task="regression", memory_budget_mb=None)
    calibration = {"input": problem.calibration["input"]}
    with pytest.raises(ValueError, match="empirical Fisher of the distill_mse loss is 0"):
        compute_sensitivity(problem.program, calibration, config)


def test_fisher_config_refuses_a_time_budget() -> None:
    with pytest.raises(ValueError, match="time_budget_s"):
        FisherConfig(time_budget_s=10.0)
    with pytest.raises(ValueError, match="bits"):
        FisherConfig(bits=(9,))

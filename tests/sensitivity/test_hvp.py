"""Hessian-vector products against the exact Hessian of a tiny model.

The tiny problem (``tiny_problem``, ``exact_hessian``... in ``tests/sensitivity/helpers.py``) is a
float64 model with a few hundred weights whose full Hessian ``torch.autograd.functional.hessian``
computes directly from an independent loss (whole set in one batch).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sensitivity.hvp import HVP_METHODS, HessianVectorProducts
from sensitivity.losses import CalibrationLoss
from sensitivity.torch_program import TorchProgram
from tests.sensitivity.helpers import CPU, TinyNet, TinyProblem, exact_gradient, exact_hessian, tiny_problem

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/sensitivity/conftest.py


@pytest.fixture(scope="module")
def problem() -> TinyProblem:
    return tiny_problem()


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _random_vector(problem: TinyProblem, seed: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(layer.shape, generator=generator, dtype=torch.float64) for layer in problem.program.layers)


def test_exact_hessian_is_symmetric(problem: TinyProblem) -> None:
    hessian = exact_hessian(problem)
    assert hessian.shape == (339, 339)
    assert np.abs(hessian - hessian.T).max() < 1e-12 * np.abs(hessian).max()


@pytest.mark.parametrize("method", HVP_METHODS)
@pytest.mark.parametrize("probes_per_pass", [1, 3])
def test_hvp_matches_exact_hessian(problem: TinyProblem, method: str, probes_per_pass: int) -> None:
    hvp = HessianVectorProducts(problem.loss(batch_size=7), method=method, probes_per_pass=probes_per_pass)
    vectors = [_random_vector(problem, seed) for seed in range(4)]
    products = hvp.many(vectors)
    hessian = exact_hessian(problem)
    for v, hv in zip(vectors, products):
        expected = hessian @ problem.flatten(v).numpy()
        assert _relative(problem.flatten(hv).numpy(), expected) < 1e-5
    assert hvp.num_hvps == 4


def test_single_vector_call_equals_batched(problem: TinyProblem) -> None:
    hvp = HessianVectorProducts(problem.loss(), probes_per_pass=4)
    v = _random_vector(problem, 7)
    single = problem.flatten(hvp(v)).numpy()
    batched = problem.flatten(hvp.many([v, _random_vector(problem, 8)])[0]).numpy()
    assert _relative(single, batched) < 1e-12


def test_gradient_and_loss_match_exact(problem: TinyProblem) -> None:
    value, gradient = HessianVectorProducts(problem.loss(batch_size=5)).gradient()
    assert value == pytest.approx(float(problem.exact_loss(problem.point())), rel=1e-12)
    assert _relative(problem.flatten(gradient).numpy(), exact_gradient(problem)) < 1e-10


def test_float32_methods_agree() -> None:
    torch.manual_seed(1)
    module = TinyNet().eval()
    calibration = {"input": np.random.default_rng(1).normal(size=(16, 1, 4, 4)).astype(np.float32)}
    loss = CalibrationLoss(TorchProgram(module), calibration, 8, CPU)
    v = tuple(torch.randn(w.shape) for w in loss.weights0.values())
    results = [torch.cat([h.reshape(-1) for h in HessianVectorProducts(loss, method=m)(v)]) for m in HVP_METHODS]
    assert float((results[0] - results[1]).norm() / results[1].norm()) < 1e-4


def test_rejects_bad_settings(problem: TinyProblem) -> None:
    with pytest.raises(ValueError, match="unknown HVP method"):
        HessianVectorProducts(problem.loss(), method="finite_differences")
    with pytest.raises(ValueError, match="probes_per_pass"):
        HessianVectorProducts(problem.loss(), probes_per_pass=0)

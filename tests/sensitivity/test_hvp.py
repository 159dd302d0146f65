"""Hessian-vector products against the exact Hessian of a tiny model.

The helpers here (``tiny_problem``, ``exact_hessian``...) build a float64 model with a
few hundred weights whose full Hessian ``torch.autograd.functional.hessian`` computes
directly from an independent loss (whole set in one batch); other test modules import them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sensitivity.hvp import HVP_METHODS, HessianVectorProducts
from sensitivity.losses import CalibrationLoss
from sensitivity.torch_program import TorchProgram

CPU = torch.device("cpu")


class TinyNet(nn.Module):
    """Conv(1->3, 3x3) - tanh - Linear(48->6) - tanh - Linear(6->outputs): 339 layer weights for 4 outputs."""

    def __init__(self, outputs: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.fc1 = nn.Linear(48, 6)
        self.fc2 = nn.Linear(6, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.conv(x))
        return self.fc2(torch.tanh(self.fc1(x.flatten(1))))


@dataclass
class TinyProblem:
    program: TorchProgram
    calibration: dict[str, np.ndarray]
    module: nn.Module

    @property
    def sizes(self) -> list[int]:
        return [layer.num_params for layer in self.program.layers]

    def flatten(self, vector) -> torch.Tensor:
        return torch.cat([t.reshape(-1) for t in vector])

    def unflatten(self, flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        parts = torch.split(flat, self.sizes)
        return tuple(p.reshape(layer.shape) for p, layer in zip(parts, self.program.layers))

    def blocks(self) -> list[slice]:
        edges = np.cumsum([0, *self.sizes])
        return [slice(int(a), int(b)) for a, b in itertools.pairwise(edges)]

    def exact_loss(self, flat: torch.Tensor) -> torch.Tensor:
        """The calibration loss over the whole set in one batch, written independently of losses.py."""
        weights = dict(zip([layer.name for layer in self.program.layers], self.unflatten(flat)))
        x = torch.from_numpy(self.calibration["input"])
        state = {**{k: v.detach() for k, v in self.module.named_parameters()}, **weights}
        logits = torch.func.functional_call(self.module, state, (x,))
        if "labels" in self.calibration:
            return F.cross_entropy(logits, torch.from_numpy(self.calibration["labels"]))
        return F.cross_entropy(logits, self._float_logits().argmax(1))

    def _float_logits(self) -> torch.Tensor:
        with torch.no_grad():
            return self.module(torch.from_numpy(self.calibration["input"]))

    def point(self) -> torch.Tensor:
        return self.flatten(tuple(self.program.layer_weights.values()))

    def loss(self, batch_size: int = 7) -> CalibrationLoss:
        return CalibrationLoss(self.program, self.calibration, batch_size, CPU)


def tiny_problem(labels: bool = True, samples: int = 24, seed: int = 0) -> TinyProblem:
    torch.manual_seed(seed)
    module = TinyNet().double().eval()
    rng = np.random.default_rng(seed)
    calibration: dict[str, np.ndarray] = {"input": rng.normal(size=(samples, 1, 4, 4))}
    if labels:
        calibration["labels"] = rng.integers(0, 4, size=samples)
    return TinyProblem(TorchProgram(module), calibration, module)


_HESSIANS: dict[tuple[bool, int], np.ndarray] = {}


def exact_hessian(problem: TinyProblem) -> np.ndarray:
    """The full Hessian over all layer weights (cached per tiny problem)."""
    key = ("labels" in problem.calibration, len(problem.calibration["input"]))
    if key not in _HESSIANS:
        _HESSIANS[key] = torch.autograd.functional.hessian(problem.exact_loss, problem.point(), vectorize=True).numpy()
    return _HESSIANS[key]


def exact_gradient(problem: TinyProblem) -> np.ndarray:
    flat = problem.point().clone().requires_grad_(True)
    return torch.autograd.grad(problem.exact_loss(flat), flat)[0].numpy()


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """One intra-op thread: these tiny products are ~15x faster than with threads fighting
    over a shared 2-core machine. Restored afterwards; other modules import this fixture."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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

"""Helpers of the sensitivity tests (plain code, not fixtures: those are in ``conftest.py``).

- ``tiny_problem``, ``exact_hessian``, ``exact_gradient``: a float64 model with a few hundred weights
  whose full Hessian ``torch.autograd.functional.hessian`` computes directly from an independent loss
  (whole set in one batch);
- ``Encoder``: modules in a ModuleList, for layer names and scopes;
- ``gradient_matches_module``: the ONNX interpreter's gradients and Hessian-vector products against
  the torch module it was exported from.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sensitivity.losses import CalibrationLoss
from sensitivity.onnx_program import OnnxProgram
from sensitivity.torch_program import TorchProgram

CPU = torch.device("cpu")


# ---------------------------------------------------------------- a tiny problem with an exact Hessian


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


# ---------------------------------------------------------------- modules in a ModuleList


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x))


class Encoder(nn.Module):
    """Modules in a ModuleList, as transformers hold their layers (encoder.layer.0.attention...)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


# ---------------------------------------------------------------- interpreter gradients against the torch module's


RTOL = 1e-4


def _float64(value: torch.Tensor | np.ndarray) -> torch.Tensor:
    return value.detach().to(torch.float64) if isinstance(value, torch.Tensor) else torch.from_numpy(value).double()


def relative_error(actual: torch.Tensor | np.ndarray, expected: torch.Tensor | np.ndarray) -> float:
    a, e = _float64(actual), _float64(expected)
    return float((a - e).norm() / e.norm().clamp_min(1e-12))


def module_counterparts(module: nn.Module, program: OnnxProgram) -> dict[str, tuple[nn.Parameter, bool]]:
    """layer name -> (module parameter, transposed?), matched by value: exporters rename and
    transpose weights (MatMul stores W^T), and folded BatchNorm weights have no counterpart."""
    matches = {}
    for layer_name, weight in program.layer_weights.items():
        for parameter in module.parameters():
            if parameter.shape == weight.shape and torch.equal(parameter.detach(), weight):
                matches[layer_name] = (parameter, False)
            elif parameter.dim() == 2 and torch.equal(parameter.detach().t(), weight):
                matches[layer_name] = (parameter, True)
    return matches


def output_loss(output: torch.Tensor) -> torch.Tensor:
    target = torch.linspace(-1.0, 1.0, output.numel()).reshape(output.shape)
    return ((output - target) ** 2).mean() + (output**3).mean()  # cubic term: a non-trivial Hessian


def gradient_matches_module(module: nn.Module, program: OnnxProgram, x: torch.Tensor) -> float:
    """dL/dW and the Hessian-vector product H v from the interpreter match the module's autograd.
    Returns the worst relative error."""
    matches = module_counterparts(module, program)
    assert matches, "no layer weight matches a module parameter"
    weights = {name: w.clone().requires_grad_() for name, w in program.layer_weights.items()}
    # layers without a module counterpart (folded BatchNorm) stay still, so both sides move
    # in the same direction
    tangents = {
        name: torch.randn(w.shape, generator=torch.Generator().manual_seed(i)) * (name in matches)
        for i, (name, w) in enumerate(weights.items())
    }

    loss = output_loss(program.forward(weights, {"input": x})[0])
    gradients = torch.autograd.grad(loss, list(weights.values()), create_graph=True)
    dot = sum(((g * tangents[name]).sum() for name, g in zip(weights, gradients)), torch.zeros(()))
    hvp = dict(zip(weights, torch.autograd.grad(dot, list(weights.values()))))

    parameters = list(module.parameters())
    module_loss = output_loss(module(x))
    module_gradients = dict(zip(map(id, parameters), torch.autograd.grad(module_loss, parameters, create_graph=True)))
    # the same direction in parameter space: a layer's tangent, other parameters still
    module_dot = sum(
        (
            (module_gradients[id(p)] * (tangents[name].t() if transposed else tangents[name])).sum()
            for name, (p, transposed) in matches.items()
        ),
        torch.zeros(()),
    )
    module_hvp = dict(zip(map(id, parameters), torch.autograd.grad(module_dot, parameters, allow_unused=True)))

    worst = 0.0
    gradient_by_name = dict(zip(weights, gradients))
    for name, (parameter, transposed) in matches.items():
        pairs = ((gradient_by_name[name], module_gradients[id(parameter)]), (hvp[name], module_hvp[id(parameter)]))
        for ours, theirs in pairs:
            theirs = theirs.t() if transposed else theirs
            worst = max(worst, relative_error(ours, theirs))
    if len(matches) == len(weights):  # every layer has a counterpart: H v must agree everywhere
        assert worst <= RTOL, worst
    return worst

"""HAWQ-V1 top eigenvalues of each layer's diagonal Hessian block by power iteration.

For layer i the iteration works in block i only: with a unit vector u nonzero only in
block i, (Hu)ᵢ = Hᵢᵢuᵢ, so λ = uᵢ·(Hu)ᵢ is the Rayleigh quotient of Hᵢᵢ and
uᵢ ← (Hu)ᵢ / ‖(Hu)ᵢ‖ is one power step. It converges to the eigenvalue of largest
magnitude (reported with its sign; for the positive semi-definite Gauss-Newton blocks of
trained models this is the top eigenvalue). A layer stops when |λₖ − λₖ₋₁| / |λₖ| <
``tolerance`` or after ``max_iterations``. All layers iterate together, so their probes
share batched HVP passes; each iteration of each layer costs one HVP.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sensitivity.hvp import HessianVectorProducts, Vector
from sensitivity.results import LayerEigen

Progress = Callable[[str, float, str], None]


@dataclass
class _PowerState:
    vector: torch.Tensor  # unit vector in block i
    eigenvalue: float = 0.0
    iterations: int = 0
    relative_change: float = math.inf
    converged: bool = False


def _block_probe(point: Vector, index: int, block: torch.Tensor) -> Vector:
    return tuple(block if j == index else torch.zeros_like(w) for j, w in enumerate(point))


def _step(state: _PowerState, product: torch.Tensor, tolerance: float) -> None:
    """One power step given (Hu)ᵢ for the current unit vector u."""
    eigenvalue = float((state.vector.double() * product.double()).sum())
    if state.iterations > 0:
        state.relative_change = abs(eigenvalue - state.eigenvalue) / max(abs(eigenvalue), 1e-300)
    state.eigenvalue = eigenvalue
    state.iterations += 1
    norm = float(product.norm())
    if norm == 0.0:  # Hᵢᵢu = 0: u is in the null space; for a zero block λ = 0 exactly
        state.relative_change, state.converged = 0.0, True
        return
    state.vector = product / norm
    state.converged = state.relative_change < tolerance


def top_eigenvalues(
    hvp: HessianVectorProducts,
    *,
    seed: int = 0,
    tolerance: float = 1e-4,
    max_iterations: int = 100,
    progress: Progress | None = None,
) -> tuple[LayerEigen, ...]:
    """Largest-magnitude eigenvalue of every diagonal block Hᵢᵢ; see the module docstring."""
    generator = torch.Generator().manual_seed(seed)
    states = []
    for w in hvp.point:
        start = torch.randn(w.shape, generator=generator, dtype=torch.float64)
        states.append(_PowerState((start / start.norm()).to(w.device, w.dtype)))
    for iteration in range(max_iterations):
        active = [i for i, s in enumerate(states) if not s.converged]
        if not active:
            break

        # map is lazy (consumed below, in this iteration); the default binds this iteration's ``active``
        def probe(k: int, active: list[int] = active) -> Vector:
            return _block_probe(hvp.point, active[k], states[active[k]].vector)

        probes = hvp.map(probe, len(active))
        for k, product in probes:
            _step(states[active[k]], product[active[k]], tolerance)
        if progress is not None:
            progress("eigenvalues", (iteration + 1) / max_iterations, f"{len(active)} layers iterating")
    return tuple(
        LayerEigen(
            name=name,
            eigenvalue=s.eigenvalue,
            iterations=s.iterations,
            converged=s.converged,
            relative_change=s.relative_change if math.isfinite(s.relative_change) else None,
        )
        for name, s in zip(hvp.names, states)
    )

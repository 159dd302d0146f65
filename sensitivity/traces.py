"""HAWQ-V2 Hessian traces by Hutchinson's estimator, all layers from the same probes.

For a Rademacher vector v over all layer weights (entries ±1 with probability ½),
E[vᵢᵀ(Hv)ᵢ] = Σ_{a∈i} Σ_b H_ab E[v_a v_b] = Tr(Hᵢᵢ), so one product Hv gives an unbiased
sample for every layer i at once. After k probes a layer's estimate is the sample mean,
with standard error s/√k (s the sample standard deviation). Sampling stops when every
layer's relative standard error SE/|Tr| is below ``tolerance`` (after at least
``min_probes``), or at ``max_probes``.

Probes are drawn on the CPU from a seeded ``torch.Generator`` and then moved to the
device, so the probe sequence is the same everywhere and a run is reproducible bit for
bit on the same device.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from sensitivity.hvp import HessianVectorProducts, Vector
from sensitivity.results import LayerTrace

Progress = Callable[[str, float, str], None]


def rademacher_probe(point: Vector, generator: torch.Generator) -> Vector:
    """A vector of independent ±1 entries shaped like ``point`` (drawn on the CPU)."""
    return tuple(
        (torch.randint(0, 2, w.shape, generator=generator, dtype=torch.int8) * 2 - 1).to(w.device, w.dtype)
        for w in point
    )


def _statistics(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard error of each column (one column per layer)."""
    mean = samples.mean(axis=0)
    standard_error = samples.std(axis=0, ddof=1) / math.sqrt(samples.shape[0])
    return mean, standard_error


def _converged(mean: np.ndarray, standard_error: np.ndarray, tolerance: float) -> bool:
    # A zero trace (e.g. a dead layer) has an infinite relative error: only the cap stops it.
    with np.errstate(divide="ignore", invalid="ignore"):
        return bool(np.all(standard_error < tolerance * np.abs(mean)))


def hutchinson_traces(
    hvp: HessianVectorProducts,
    *,
    seed: int = 0,
    tolerance: float = 0.05,
    min_probes: int = 8,
    max_probes: int = 256,
    progress: Progress | None = None,
) -> tuple[LayerTrace, ...]:
    """Tr(Hᵢᵢ) for every layer with its standard error; see the module docstring."""
    generator = torch.Generator().manual_seed(seed)
    rows: list[np.ndarray] = []
    while len(rows) < max_probes:
        count = min(hvp.probes_per_pass, max_probes - len(rows))
        probes = [rademacher_probe(hvp.point, generator) for _ in range(count)]
        for v, hv in zip(probes, hvp.many(probes)):
            rows.append(np.array([float((a.double() * b.double()).sum()) for a, b in zip(v, hv)]))
        if progress is not None:
            progress("traces", len(rows) / max_probes, f"{len(rows)} probes")
        if len(rows) >= min_probes:
            mean, standard_error = _statistics(np.stack(rows))
            if _converged(mean, standard_error, tolerance):
                break
    mean, standard_error = _statistics(np.stack(rows))
    sizes = [int(w.numel()) for w in hvp.point]
    return tuple(
        LayerTrace(name=name, num_params=n, trace=float(m), standard_error=float(se), num_probes=len(rows))
        for name, n, m, se in zip(hvp.names, sizes, mean, standard_error)
    )

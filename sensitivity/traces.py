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
import time
from collections.abc import Callable
from typing import Any

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


def hutchinson_traces(
    hvp: HessianVectorProducts,
    *,
    seed: int = 0,
    tolerance: float = 0.05,
    min_probes: int = 8,
    max_probes: int = 256,
    time_budget_s: float | None = None,
    progress: Progress | None = None,
    report: dict[str, Any] | None = None,
) -> tuple[LayerTrace, ...]:
    """Tr(Hᵢᵢ) for every layer with its standard error; see the module docstring.

    ``time_budget_s`` stops the probes once spent (after 2, the fewest a standard error needs).
    ``report``, when given, receives why sampling stopped ("converged", "max_probes" or
    "time_budget"), the probes drawn and the worst relative standard error reached."""
    generator = torch.Generator().manual_seed(seed)
    rows: list[np.ndarray] = []
    start = time.perf_counter()
    stopped = "max_probes"
    while len(rows) < max_probes:
        count = min(hvp.probes_per_pass, max_probes - len(rows))
        probes = [rademacher_probe(hvp.point, generator) for _ in range(count)]
        for v, hv in zip(probes, hvp.many(probes)):
            rows.append(np.array([float((a.double() * b.double()).sum()) for a, b in zip(v, hv)]))
        elapsed = time.perf_counter() - start
        worst = _worst_relative_error(np.stack(rows)) if len(rows) >= 2 else math.inf
        if progress is not None:
            progress(
                "traces",
                len(rows) / max_probes,
                _progress_message(len(rows), worst, tolerance, max_probes, elapsed, time_budget_s),
            )
        if len(rows) >= min_probes and worst < tolerance:
            stopped = "converged"
            break
        if time_budget_s is not None and elapsed >= time_budget_s and len(rows) >= 2:
            stopped = "time_budget"
            break
    samples = np.stack(rows)
    mean, standard_error = _statistics(samples)
    if report is not None:
        report.update(
            stopped=stopped, probes=len(rows), worst_relative_se=_finite_or_none(_worst_relative_error(samples))
        )
    sizes = [int(w.numel()) for w in hvp.point]
    return tuple(
        LayerTrace(name=name, num_params=n, trace=float(m), standard_error=float(se), num_probes=len(rows))
        for name, n, m, se in zip(hvp.names, sizes, mean, standard_error)
    )


def _worst_relative_error(samples: np.ndarray) -> float:
    """max over layers of SE/|trace| (inf while a trace is 0: only the caps stop it then)."""
    mean, standard_error = _statistics(samples)
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = np.where(standard_error == 0, 0.0, standard_error / np.abs(mean))
    return float(np.nanmax(relative)) if relative.size else 0.0


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _progress_message(
    probes: int, worst: float, tolerance: float, max_probes: int, elapsed: float, time_budget_s: float | None
) -> str:
    """ "12 probes, worst SE/|trace| 0.083 (target 0.05), ETA 40 s". SE falls as 1/√k, so about
    k·(worst/tolerance)² probes reach the target; the caps bound the estimate."""
    if not math.isfinite(worst):
        return f"{probes} probes"
    needed = min(max_probes, max(probes, math.ceil(probes * (worst / tolerance) ** 2)))
    eta = (needed - probes) * elapsed / probes
    if time_budget_s is not None:
        eta = min(eta, max(time_budget_s - elapsed, 0.0))
    return f"{probes} probes, worst SE/|trace| {worst:.3f} (target {tolerance:g}), ETA {eta:.0f} s"

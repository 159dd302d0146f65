"""Accuracy-constrained search: demote the least sensitive layers, bisecting on how many.

Every demotable layer i (it has both the ``high`` and the ``low`` candidate and ``low`` is
cheaper) is ranked by predicted sensitivity per unit of cost saved; a layer without ``high``
(an excluded one offers fp32 alone) stays where ``Objective.uniform(high)`` puts it, in every
step. The ranking:

- ``diagonal``:   score_i = (Ωᵢ(low) − Ωᵢ(high)) / (sᵢ(high) − sᵢ(low)), ascending;
- ``interlayer``: greedy; with D the layers already demoted and x_D that configuration, the
  next layer minimises (ΔL(x_{D∪{i}}) − ΔL(x_D)) / (sᵢ(high) − sᵢ(low)), so its score
  includes its cross terms G with the layers in D.

Configuration k demotes the first k layers of that order, so its cost decreases with k. The
search measures the real drop (``measure(configuration)``, in percentage points) and returns
the largest k whose measured drop ≤ tolerance:

1. measure k = n (all demoted); within tolerance -> done (1 evaluation);
2. bisect on k over (0, n) keeping lo = the largest measured k within tolerance (0 at the
   start, not yet measured) and hi = a measured k above it out of tolerance;
3. if lo is still 0, measure the baseline k = 0.

That is at most 1 + ⌈log₂ n⌉ + 1 evaluations. The returned point is always a measured one;
when drops are not monotone in k it is still the cheapest measured point within tolerance
(lo only grows, every other point within tolerance has a smaller k). When even the baseline
is out of tolerance it is returned with ``within_tolerance`` False.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from planner.objective import FP32, Objective

Measure = Callable[[dict[str, str]], float]
ORDERINGS = ("diagonal", "interlayer")


@dataclass(frozen=True)
class BisectionStep:
    """One measured configuration: k layers of the order demoted."""

    k: int
    configuration: Mapping[str, str]
    cost: float
    predicted_omega: float  # Ω(c)
    predicted_loss: float  # ΔL(c)
    drop: float  # measured, percentage points

    def to_dict(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "configuration": dict(self.configuration),
            "cost": self.cost,
            "predicted_omega": self.predicted_omega,
            "predicted_loss": self.predicted_loss,
            "drop": self.drop,
        }


@dataclass(frozen=True)
class BisectionResult:
    """The chosen step, the demotion order (layer names) and every measured step, in order."""

    best: BisectionStep
    within_tolerance: bool
    tolerance: float
    order: tuple[str, ...]
    steps: tuple[BisectionStep, ...]

    @property
    def configuration(self) -> Mapping[str, str]:
        return self.best.configuration

    @property
    def evaluations(self) -> int:
        return len(self.steps)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data: the chosen step, the order and every measured step."""
        return {
            "best": self.best.to_dict(),
            "within_tolerance": self.within_tolerance,
            "tolerance": self.tolerance,
            "order": list(self.order),
            "steps": [step.to_dict() for step in self.steps],
        }


def max_evaluations(n_demotable: int) -> int:
    """The evaluation bound ⌈log₂ n⌉ + 2 (1 when nothing is demotable)."""
    return 1 if n_demotable == 0 else math.ceil(math.log2(n_demotable)) + 2


def demotion_order(
    objective: Objective, kind: str, *, low: str, high: str = FP32, ordering: str = "diagonal"
) -> list[int]:
    """Demotable layers (indices), least sensitive per unit of cost saved first."""
    if ordering not in ORDERINGS:
        raise ValueError(f"ordering must be one of {ORDERINGS}, got {ordering!r}")
    demotable = _demotable(objective, kind, low, high)
    saving = {i: _cost(objective, kind, i, high) - _cost(objective, kind, i, low) for i in demotable}
    if ordering == "diagonal":
        omega = objective.omega
        increase = {i: omega[i][_at(objective, i, low)] - omega[i][_at(objective, i, high)] for i in demotable}
        return sorted(demotable, key=lambda i: (increase[i] / saving[i], i))
    return _interlayer_order(objective, demotable, saving, low, high)


def bisect(
    objective: Objective,
    kind: str,
    measure: Measure,
    tolerance: float,
    *,
    low: str,
    high: str = FP32,
    ordering: str = "diagonal",
) -> BisectionResult:
    """The cheapest measured configuration with drop ≤ ``tolerance`` (see the module docstring).

    ``measure(configuration)`` gets a mapping layer name -> candidate name and returns the
    measured drop in percentage points; it is called at most ``max_evaluations(n)`` times.
    """
    if not math.isfinite(tolerance):
        raise ValueError(f"tolerance must be a finite number of percentage points, got {tolerance}")
    order = demotion_order(objective, kind, low=low, high=high, ordering=ordering)
    steps: list[BisectionStep] = []

    def run(k: int) -> BisectionStep:
        configuration = _demoted(objective, order[:k], low, high)
        drop = float(measure(dict(configuration)))
        if not math.isfinite(drop):
            raise ValueError(f"measure returned a non-finite drop {drop} for k={k}")
        omega, loss = objective.evaluate(configuration)
        step = BisectionStep(k, configuration, objective.cost(configuration, kind), omega, loss, drop)
        steps.append(step)
        return step

    n = len(order)
    best = run(n)
    if best.drop > tolerance and n > 0:
        lo, hi, best_lo = 0, n, None
        while hi - lo > 1:
            step = run((lo + hi) // 2)
            if step.drop <= tolerance:
                lo, best_lo = step.k, step
            else:
                hi = step.k
        best = best_lo if best_lo is not None else run(0)
    return BisectionResult(
        best=best,
        within_tolerance=best.drop <= tolerance,
        tolerance=tolerance,
        order=tuple(objective.layers[i] for i in order),
        steps=tuple(steps),
    )


# ----- helpers --------------------------------------------------------------------------------


def _at(objective: Objective, i: int, candidate: str) -> int:
    return objective.candidates[i].index(candidate)


def _cost(objective: Objective, kind: str, i: int, candidate: str) -> float:
    return float(objective.cost_table(kind)[i][_at(objective, i, candidate)])


def _demotable(objective: Objective, kind: str, low: str, high: str) -> list[int]:
    """Layers that have ``high`` and ``low`` and save cost by demoting; some layer must have each."""
    for candidate, role in ((high, "the undemoted precision"), (low, "to demote to")):
        if not any(candidate in names for names in objective.candidates):
            raise ValueError(f"no layer has the candidate {candidate!r} ({role})")
    return [
        i
        for i, names in enumerate(objective.candidates)
        if low in names and high in names and _cost(objective, kind, i, low) < _cost(objective, kind, i, high)
    ]


def _demoted(objective: Objective, layers: list[int], low: str, high: str) -> dict[str, str]:
    """The given layers at ``low``, the others at ``high`` where they offer it (``Objective.uniform``)."""
    configuration = objective.uniform(high)
    configuration.update({objective.layers[i]: low for i in layers})
    return configuration


def _interlayer_order(
    objective: Objective, demotable: list[int], saving: dict[int, float], low: str, high: str
) -> list[int]:
    """Greedy order by ΔL increase per cost saved, given the layers already demoted.

    Moving layer i from c = (i, high) to a = (i, low) changes ΔL by
    l_a − l_c + (Gx)_a − (Gx)_c + ½ G_aa + ½ G_cc − G_ac (x the current configuration).
    """
    G, linear = objective.G, objective.flat_linear
    support = objective.flat_indices(_demoted(objective, [], low, high))
    Gx = G[:, support].sum(axis=1)
    remaining = list(demotable)
    order = []
    while remaining:
        a = np.array([objective.index(i, low) for i in remaining])
        c = np.array([objective.index(i, high) for i in remaining])
        increase = linear[a] - linear[c] + Gx[a] - Gx[c] + 0.5 * G[a, a] + 0.5 * G[c, c] - G[a, c]
        score = increase / np.array([saving[i] for i in remaining])
        pick = int(np.argmin(score))
        order.append(remaining.pop(pick))
        Gx += G[:, a[pick]] - G[:, c[pick]]
    return order

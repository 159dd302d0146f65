"""Per-layer precision search, quantized ONNX export and measurement.

The one verb is ``plan(model, calibration, request) -> PlanResult`` (``planner.plan``); the
pieces it glues are public too, imported on first use (PEP 562).

``plan`` is imported eagerly: the function shares its name with its module, and the import
system binds ``planner.plan`` to the module when the submodule is first loaded, so the function
must be bound after that load, here.
"""

from __future__ import annotations

import importlib
from typing import Any

from planner.choose import NoFeasiblePlan, minimum_cost
from planner.plan import normalize_for_plan, plan
from planner.predict import build_objective
from planner.request import PlanRequest
from planner.result import Measurement, PlanPoint, PlanResult, PlanRun

_EAGER = [
    "Measurement",
    "NoFeasiblePlan",
    "PlanPoint",
    "PlanRequest",
    "PlanResult",
    "PlanRun",
    "build_objective",
    "minimum_cost",
    "normalize_for_plan",
    "plan",
]
_EXPORTS: dict[str, str] = {
    # candidates and configurations
    "CANDIDATES": "planner.candidates",
    "Candidate": "planner.candidates",
    "Configuration": "planner.candidates",
    "get_candidate": "planner.candidates",
    "parse_candidates": "planner.candidates",
    # costs
    "Cost": "planner.cost",
    "CostTable": "planner.cost",
    "configuration_cost": "planner.cost",
    "layer_cost_table": "planner.cost",
    # search
    "Objective": "planner.objective",
    "Frontier": "planner.frontier",
    "InfeasibleBudget": "planner.frontier",
    "diagonal_frontier": "planner.frontier",
    "solve_budget": "planner.frontier",
    "QuadraticResult": "planner.quadratic",
    "quadratic_frontier": "planner.quadratic",
    "solve_quadratic": "planner.quadratic",
    "BisectionResult": "planner.bisection",
    "bisect": "planner.bisection",
    "demotion_order": "planner.bisection",
    "Exclusion": "planner.exclude",
    "LayerCandidates": "planner.exclude",
    "layer_candidates": "planner.exclude",
    # export and measurement
    "ExportError": "planner.export",
    "ExportedModel": "planner.export",
    "export_model": "planner.export",
    "read_plan": "planner.export",
    "Evaluation": "planner.evaluate",
    "evaluate": "planner.evaluate",
    "LatencyMeasurement": "planner.latency",
    "measure_latency": "planner.latency",
}

__all__ = sorted([*_EAGER, *_EXPORTS])


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'planner' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

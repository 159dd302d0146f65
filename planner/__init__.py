"""Per-layer precision search, quantized ONNX export and measurement.

The one verb is ``plan(model, calibration, request) -> PlanResult`` (``planner.plan``); the pieces it
glues are public too. ``__all__`` lists them: what the service and the benchmarks use, and the
pipeline's steps (``planner.plan``'s module doc names them).

Imported eagerly, plainly: ``planner.plan`` already imports nearly every module of the package (and
torch, through ``sensitivity``), so deferring the others saved nothing. ``planner.plan`` is the
function after this import: the import system binds the attribute to the submodule when it is first
loaded, and the ``from planner.plan import plan`` below rebinds it; read the module as
``sys.modules["planner.plan"]``.
"""

from __future__ import annotations

from planner.bisection import BisectionResult, bisect, demotion_order
from planner.candidates import CANDIDATES, Candidate, Configuration, get_candidate, parse_candidates
from planner.choose import NoFeasiblePlan, minimum_cost
from planner.cost import (
    Cost,
    CostTable,
    LayerCost,
    ShapesUnknown,
    configuration_cost,
    layer_bops,
    layer_cost_table,
    layer_size_bytes,
    unchanged_bytes,
)
from planner.evaluate import Evaluation, evaluate
from planner.exclude import Exclusion, LayerCandidates, layer_candidates, match_patterns
from planner.export import ExportedModel, ExportError, check_inputs, export_model, read_plan
from planner.frontier import Frontier, InfeasibleBudget, diagonal_frontier, solve_budget
from planner.latency import LatencyMeasurement, RelativeLatency, compare_latency, measure_latency
from planner.measured import LossChangeMeter, configuration_loss_changes, measured_terms
from planner.objective import Objective
from planner.plan import normalize_for_plan, plan, plan_module
from planner.predict import build_objective
from planner.quadratic import QuadraticResult, quadratic_frontier, solve_quadratic
from planner.request import DEFAULT_CANDIDATES, DEFAULT_METHOD, PlanRequest
from planner.result import Measurement, PlanPoint, PlanResult, PlanRun

__all__ = [
    "CANDIDATES",
    "DEFAULT_CANDIDATES",
    "DEFAULT_METHOD",
    "BisectionResult",
    "Candidate",
    "Configuration",
    "Cost",
    "CostTable",
    "Evaluation",
    "Exclusion",
    "ExportError",
    "ExportedModel",
    "Frontier",
    "InfeasibleBudget",
    "LatencyMeasurement",
    "LayerCandidates",
    "LayerCost",
    "LossChangeMeter",
    "Measurement",
    "NoFeasiblePlan",
    "Objective",
    "PlanPoint",
    "PlanRequest",
    "PlanResult",
    "PlanRun",
    "QuadraticResult",
    "RelativeLatency",
    "ShapesUnknown",
    "bisect",
    "build_objective",
    "check_inputs",
    "compare_latency",
    "configuration_cost",
    "configuration_loss_changes",
    "demotion_order",
    "diagonal_frontier",
    "evaluate",
    "export_model",
    "get_candidate",
    "layer_bops",
    "layer_candidates",
    "layer_cost_table",
    "layer_size_bytes",
    "match_patterns",
    "measure_latency",
    "measured_terms",
    "minimum_cost",
    "normalize_for_plan",
    "parse_candidates",
    "plan",
    "plan_module",
    "quadratic_frontier",
    "read_plan",
    "solve_budget",
    "solve_quadratic",
    "unchanged_bytes",
]

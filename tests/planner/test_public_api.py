"""planner's public API: what ``import planner`` offers, and the one definition of the default candidates."""

from __future__ import annotations

import importlib
import sys

import planner

# What the service and the benchmarks import from planner, and the pipeline's steps (planner/__init__.py).
PUBLIC = [
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


def test_the_public_names_are_pinned():
    assert sorted(planner.__all__) == sorted(PUBLIC)
    assert len(set(planner.__all__)) == len(planner.__all__)


def test_every_public_name_resolves_to_what_a_planner_module_defines():
    for name in planner.__all__:
        value = getattr(planner, name)
        if callable(value):  # classes and functions: defined in planner, not re-exported from elsewhere
            assert value.__module__.startswith("planner."), (name, value.__module__)
    # `plan` is the verb; its module is reached through sys.modules (the attribute is the function)
    assert sys.modules["planner.plan"].plan is planner.plan
    assert importlib.import_module("planner.plan") is sys.modules["planner.plan"]


def test_a_star_import_gives_the_public_names_only():
    namespace: dict[str, object] = {}
    exec("from planner import *", namespace)
    assert sorted(set(namespace) - {"__builtins__"}) == sorted(PUBLIC)


def test_the_service_copies_of_the_default_candidates_and_method_are_the_planners():
    """The API and the CLI write them out (their processes do not import torch); one definition rules."""
    from planner.request import PROBING_METHODS
    from service.api import jobs as api_jobs
    from service.api import plans as api_plans
    from service.cli import local_commands, options

    assert planner.PlanRequest().method == planner.DEFAULT_METHOD
    assert api_plans.PlanRequestIn.model_fields["method"].default == planner.DEFAULT_METHOD
    assert api_jobs.SensitivityRequest.model_fields["method"].default == planner.DEFAULT_METHOD
    assert local_commands.DEFAULT_METHOD == planner.DEFAULT_METHOD
    assert options.PROBING_METHODS == PROBING_METHODS

    assert planner.PlanRequest().candidates == planner.DEFAULT_CANDIDATES
    assert tuple(api_plans.DEFAULT_CANDIDATES) == planner.DEFAULT_CANDIDATES
    assert tuple(local_commands.DEFAULT_CANDIDATES.split(",")) == planner.DEFAULT_CANDIDATES
    assert api_plans.PlanRequestIn.model_fields["candidates"].get_default(call_default_factory=True) == list(
        planner.DEFAULT_CANDIDATES
    )

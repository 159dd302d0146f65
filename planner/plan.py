"""The one verb of the planner: ``plan(model, calibration, request) -> PlanResult``.

Steps (DESIGN.md's data flow), each one module:

0. the request (``planner.request``) is checked on construction; normalisation
   (``sensitivity.normalize``, ``normalize_for_plan``): Constant weights become initializers, -1
   dims are dynamic, a quantized model is refused, and the opset is upgraded to what the
   candidates' export needs and checked in onnxruntime on the first calibration samples, before
   anything costly runs; every later step uses the normalised model, so layer names agree;
1. sensitivity (``planner.predict.analyse``): ``compute_sensitivity`` with what the method needs,
   unless a result is given: traces (``hawq_v2``), or an ``InterLayerConfig`` for the weight bit
   widths the candidates need (``interlayer``: traces, g·Δ, G and Ω in one analysis);
2. objective (``planner.predict.build_objective``): per layer × candidate, Ω and g·Δ and the G
   blocks from the candidate's weight bits (fp32 -> zeros; w8a8 and w8 share the 8-bit Δ), size
   bytes and BOPS from ``layer_cost_table``; each layer has the candidates it is offered
   (``planner.exclude``: a layer the request's ``exclude`` matches offers fp32 alone, a structural
   constant only what represents it exactly), so no search ever considers anything else for it;
3. search (``planner.choose``), with the latency table first when its cost axis is latency
   (``planner.latency_table``: measured, or the one given when it was measured for this model,
   device, onnxruntime version and batch size): ``pareto`` builds the whole frontier (exact DP on Ω for
   ``hawq_v2``, the quadratic solver on ΔL for ``interlayer``) and picks the best point within the
   budget; ``bisection`` demotes the least sensitive layers, measuring each step for real; how
   the budgets are enforced is told there;
4. measurement (``planner.measure``): the chosen plan, up to ``max_frontier_points`` frontier
   points and the uniform configurations are exported (``export_model``) and evaluated in
   onnxruntime, with latency;
5. the result (``planner.result``): chosen configuration, predicted and measured figures (each
   measurement against both baseline models, fp32 and fp16: ``Measurement.against``), frontier,
   uniform configurations, the baseline models measured, the artifact (bytes + sha256, the plan in
   its metadata), the excluded layers with their reasons, every layer's node name and scope, and how the run went (``PlanRun``:
   versions, timings, evaluations, the search's details, what normalisation changed).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
import torch

from planner.choose import bisection, check_budget_feasible, meets_constraints, pareto, predicted_point
from planner.cost import CostTable, layer_cost_table
from planner.exclude import layer_candidates
from planner.export import check_inputs, required_opset
from planner.export import versions as export_versions
from planner.latency_table import LatencyTable, latency_table_for, with_latency_costs
from planner.measure import Measurer, Progress
from planner.objective import Objective
from planner.predict import analyse, build_objective, measured_activation_terms
from planner.request import PlanRequest
from planner.result import PlanPoint, PlanResult, PlanRun, listed_frontier
from sensitivity.layers import find_layers
from sensitivity.normalize import NormalizedModel, normalize_model, refuse_quantized
from sensitivity.onnx_program import check_supported
from sensitivity.results import SensitivityResult
from sensitivity.run import no_progress
from sensitivity.samples import input_sample_axes, one_sample_shapes


def plan(
    model: onnx.ModelProto | NormalizedModel,
    calibration: Mapping[str, np.ndarray],
    request: PlanRequest,
    *,
    evaluation: Mapping[str, np.ndarray] | None = None,
    sensitivity: SensitivityResult | None = None,
    progress: Progress | None = None,
    latency_table: LatencyTable | None = None,
) -> PlanResult:
    """Choose, export and measure a mixed-precision configuration of ``model`` (see the module doc).

    ``calibration`` (and ``evaluation``, default: the calibration set) map the model inputs,
    and optionally ``labels``, to arrays with samples on each input's sample axis (axis 0 unless the
    declared shapes or ``request.sample_axes`` say otherwise: ``sensitivity.samples``). ``model`` may already
    be normalised (``normalize_for_plan``: the worker does so before its sensitivity analysis).
    Raises ``ValueError`` for bad input (``UnsupportedOpsError`` for ops the sensitivity analysis
    lacks, ``AlreadyQuantizedError``, ``OpsetUpgradeError``) and ``NoFeasiblePlan`` when no
    configuration meets the constraints. ``latency_table``: one measured before (stored by the
    service); used when its key matches this model, device, onnxruntime version, batch size and
    candidates, else a new one is measured (``planner.latency_table``; only when the search's cost is
    latency). The table used is in ``run.search["latency_table"]``.
    """
    progress = progress or no_progress
    timings: dict[str, float] = {}
    start = time.perf_counter()
    normalized = normalize_for_plan(model, calibration, request)
    model = normalized.model
    if sensitivity is None:  # the analysis interprets the graph: name unsupported ops before anything runs
        check_supported(model)
    evaluation = calibration if evaluation is None else evaluation
    axes = input_sample_axes(model, request.sample_axes)  # resolved once; every later step takes them
    check_inputs(model, evaluation, what="evaluation set", sample_axes=axes)

    table = layer_cost_table(model, _sample_shape(model, calibration, axes))
    offered = layer_candidates(model, request.candidates, request.exclude)  # an unmatched pattern: named here
    check_budget_feasible(table, request, offered)  # before the costly analysis
    sensitivity = analyse(normalized, calibration, request, sensitivity, progress, timings, axes)
    measurer = Measurer(normalized, calibration, evaluation, request, progress, axes)
    activation = measured_activation_terms(model, calibration, request, sensitivity, offered, measurer, timings)
    progress("objective", 0.0, "building the objective")
    objective = build_objective(sensitivity, table, request.candidates, model, activation, offered=offered.offered)
    latency_details: dict[str, Any] = {}
    if request.needs_latency_table:
        table_start = time.perf_counter()
        latency_table, reused = latency_table_for(
            normalized, calibration, request, latency_table, sample_axes=axes, progress=progress
        )
        objective, table = with_latency_costs(objective, table, latency_table)
        latency_details = {"latency_table": latency_table.to_dict(), "latency_table_reused": reused}
        timings["latency_table"] = time.perf_counter() - table_start

    search_start = time.perf_counter()
    search = bisection if request.search == "bisection" else pareto
    chosen, frontier, details = search(objective, table, request, measurer)
    details = {**details, **latency_details}
    timings["search"] = time.perf_counter() - search_start
    evaluations = measurer.count

    measure_start = time.perf_counter()
    chosen = measurer.measured(chosen)
    frontier = [measurer.measured(p) if measurer.has(p.configuration) else p for p in frontier]
    uniform = _uniform(objective, table, request, measurer) if request.measure_uniform else {}
    timings["measure"] = time.perf_counter() - measure_start
    timings["total"] = time.perf_counter() - start
    artifact = measurer.export(chosen.configuration)
    measured = measurer.measure(chosen.configuration)
    progress("done", 1.0, f"plan measured: {measured.metric:.2f} % ({measured.metric_name})")
    return PlanResult(
        request=request,
        plan=chosen,
        meets_constraints=meets_constraints(chosen, request),
        frontier=listed_frontier(frontier),
        uniform=uniform,
        artifact_bytes=artifact.model_bytes,
        artifact_sha256=artifact.sha256,
        sensitivity=sensitivity.to_dict(),
        run=PlanRun(
            versions={**sensitivity.versions, **export_versions()},
            timings=timings,
            evaluations=evaluations,
            search=details,
            normalization=normalized.to_dict(),
        ),
        activation_terms=activation,
        excluded=offered.exclusions,
        layer_nodes={layer.name: {"node_name": layer.node_name, "scope": layer.scope} for layer in find_layers(model)},
        baselines=measurer.baselines(),
    )


def plan_module(
    module: torch.nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    calibration: Mapping[str, np.ndarray],
    request: PlanRequest,
    *,
    dynamic_batch: bool = True,
    evaluation: Mapping[str, np.ndarray] | None = None,
    sensitivity: SensitivityResult | None = None,
    progress: Progress | None = None,
) -> PlanResult:
    """``plan`` for an ``nn.Module`` in hand, as ``mpq plan`` plans the module saved as ``.pt2``: exported to
    ONNX (``sensitivity.torch_onnx.export_module``: ``torch.export`` with a dynamic batch unless
    ``dynamic_batch`` is False, then torch's ONNX exporter, layers named by their parameters, BatchNorm
    folded), the arrays checked against its inputs (keyed by the forward argument names), the export
    checked against the module on the first calibration samples, then planned like any ONNX model."""
    from sensitivity.torch_onnx import export_module

    export = export_module(module, example_inputs, dynamic_batch=dynamic_batch)
    check_inputs(export.model, calibration, what="calibration set", sample_axes=request.sample_axes)
    model = export.verified(calibration).model
    return plan(model, calibration, request, evaluation=evaluation, sensitivity=sensitivity, progress=progress)


def normalize_for_plan(
    model: onnx.ModelProto | NormalizedModel, calibration: Mapping[str, np.ndarray], request: PlanRequest
) -> NormalizedModel:
    """The model normalised to the opset the request's candidates export to, an upgrade checked on
    the first calibration samples: the step before any costly work. A quantized model is refused
    before the data is looked at; the calibration set is checked against the model before the
    upgrade check runs it, so a mismatch is named rather than failing inside onnxruntime."""
    source = model.model if isinstance(model, NormalizedModel) else model
    refuse_quantized(source)
    check_inputs(source, calibration, what="calibration set", sample_axes=request.sample_axes)
    return normalize_model(
        model, opset=required_opset(request.candidates), samples=calibration, sample_axes=request.sample_axes
    )


def _sample_shape(
    model: onnx.ModelProto, calibration: Mapping[str, np.ndarray], axes: Mapping[str, int | None]
) -> dict[str, tuple[int, ...]]:
    """The calibration arrays' shapes with one sample (shared inputs whole): BOPS are counted per sample."""
    return one_sample_shapes(check_inputs(model, calibration, what="calibration set", sample_axes=axes), axes)


def _uniform(objective: Objective, table: CostTable, request: PlanRequest, measurer: Measurer) -> dict[str, PlanPoint]:
    """Each candidate b at every layer that offers it (excluded layers stay fp32: ``Objective.uniform``)."""
    return {
        name: measurer.measured(predicted_point(objective, table, objective.uniform(name)))
        for name in request.candidates
    }

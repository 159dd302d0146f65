"""The one verb of the planner: ``plan(model, calibration, request) -> PlanResult``.

Steps (DESIGN.md's data flow):

0. normalisation (``sensitivity.normalize``, ``normalize_for_plan``): Constant weights become
   initializers, -1 dims are dynamic, a quantized model is refused, and the opset is upgraded to
   what the candidates' export needs and checked in onnxruntime on the first calibration samples,
   before anything costly runs; every later step uses the normalised model, so layer names agree;
1. sensitivity: ``compute_sensitivity`` with what the method needs, unless a result is given:
   traces (``hawq_v2``), or an ``InterLayerConfig`` for the weight bit widths the candidates need
   (``interlayer``: traces, g·Δ, G and Ω in one analysis);
2. objective: per layer × candidate, Ω and g·Δ and the G blocks from the candidate's weight bits
   (fp32 -> zeros; w8a8 and w8 share the 8-bit Δ), size bytes and BOPS from ``layer_cost_table``;
   each layer has the candidates it is offered (``planner.exclude``: a layer the request's
   ``exclude`` matches offers fp32 alone, a structural constant only what represents it exactly),
   so no search ever considers anything else for it;
3. search: ``pareto`` builds the whole frontier (exact DP on Ω for ``hawq_v2``, the quadratic
   solver on ΔL for ``interlayer``) and picks the best point within the budget; ``bisection``
   demotes the least sensitive layers, measuring each step for real;
4. measurement: the chosen plan, up to ``max_frontier_points`` frontier points and the uniform
   configurations are exported (``export_model``) and evaluated in onnxruntime, with latency;
5. the result: chosen configuration, predicted and measured figures, frontier, uniform
   baselines, the artifact (bytes + sha256, the plan in its metadata), versions, the excluded
   layers with their reasons, and every layer's node name and scope.

Budgets: ``max_size_bytes`` and ``max_bops`` are computed costs (``planner.cost``: weight
storage plus the other initializers and the float graph's own bytes; BOPS of one sample), so the
search enforces them exactly. The artifact also holds Q/DQ nodes and the plan's metadata
(ppocrv4-rec's size plan came out 9.7 % above a size that left the graph out), so
``max_size_bytes`` is checked on the artifact too:
when the chosen one is larger, the budget shrinks by the measured excess and the search runs
again (``SIZE_RETRIES``), and ``meets_constraints`` reads the measured size where there is one. ``max_latency_ms`` cannot be predicted per layer cheaply (a per-layer
latency table would need one measured export per layer and candidate, and latency is not
additive across QDQ boundaries), so frontier points are measured and the measured ones are
compared with it (see ``_choose_by_latency``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from planner.activation import ActivationTerm, activation_terms
from planner.bisection import bisect
from planner.candidates import CANDIDATES, Configuration, parse_candidates
from planner.cost import CostTable, layer_bops, layer_cost_table, layer_size_bytes
from planner.evaluate import METRICS, evaluate
from planner.exclude import Exclusion, LayerCandidates, check_exclude, layer_candidates
from planner.export import ExportedModel, ExportError, check_inputs, export_model, required_opset
from planner.export import versions as export_versions
from planner.frontier import InfeasibleBudget, diagonal_frontier, solve_budget
from planner.latency import LatencyMeasurement, measure_latency
from planner.objective import Objective
from planner.quadratic import quadratic_frontier, solve_quadratic
from sensitivity.checks import check_bool, check_choice, check_float, check_int, set_fields, shown
from sensitivity.interlayer import perturbations, shrunk, shrunk_gradient_terms
from sensitivity.layers import find_layers
from sensitivity.normalize import NormalizedModel, normalize_model, refuse_quantized
from sensitivity.onnx_program import check_supported
from sensitivity.results import (
    MAX_SEED,
    InterLayerConfig,
    InterLayerTerms,
    SensitivityResult,
    TraceConfig,
    check_device,
)
from sensitivity.samples import check_sample_axes, input_sample_axes, one_sample_shapes

logger = logging.getLogger(__name__)
Progress = Callable[[str, float, str], None]

METHODS = ("hawq_v2", "interlayer")
SEARCHES = ("pareto", "bisection")
DEFAULT_CANDIDATES = ("fp32", "w8a8", "w4a8", "w8", "w4")
BUDGET_FIELDS = ("max_size_bytes", "max_bops", "max_latency_ms")
# Searches again when the chosen artifact is above max_size_bytes; the excess is the graph and Q/DQ
# bytes the computed size leaves out, so one retry usually fits (ppocrv4-rec: 9.7 % over, then in).
SIZE_RETRIES = 3
# Options the request sets itself; the rest of InterLayerConfig's fields may be given.
_OWNED_SENSITIVITY_OPTIONS = ("bits", "seed", "device")
# The frontier listed in a result is thinned to this many points (always keeping the measured
# ones): a DP frontier of a large model can have many thousands of points.
MAX_LISTED_FRONTIER = 256
REQUEST_METADATA_KEY = "mpq.request"

# Bounds of the request's fields (the API's schema in service/api_plans.py states the same ones).
# Values arrive from JSON (any type, any size); see sensitivity/checks.py for what ints and numbers
# must be. The sensitivity options are bounded by InterLayerConfig (sensitivity/results.py).

# Size and BOPS budgets are ints: computed costs are (planner.cost), and a fractional budget means
# the same as its floor. 2**63 - 1 keeps them int64 (numpy, BigInteger columns) and exact to compare;
# a budget above any model's cost is the same as no budget.
MAX_COST = 2**63 - 1
# A model taking an hour per run could not be measured within a job's time limit (6 h by default;
# each measured point runs it latency_warmup + latency_repeats times): a larger budget means none.
MAX_LATENCY_MS = 3_600_000
# max_drop is in percentage points of a metric in percent.
MAX_DROP = 100
# Measured points: each is an export, an evaluation and a latency measurement (seconds to minutes
# each on a real model); 64 is 8x the default and a dense frontier for the dashboard.
MAX_FRONTIER_POINTS = 64
# Latency settings, as for re-measuring a plan over the API (service/api_plans.LatencyRequest):
# 10 000 runs of a 10 ms model is 100 s per measured point.
MAX_LATENCY_REPEATS = 10_000
MAX_LATENCY_WARMUP = 1_000
MAX_LATENCY_BATCH_SIZE = 4_096
# Per solve of the quadratic search: plan() solves at up to 16 frontier budgets (quadratic_frontier's
# max_points) and at the request's budget, so 120 s bounds a plan's solver time at 34 minutes.
MAX_SOLVER_TIME_LIMIT_S = 120
# Candidate names given (repeats allowed and dropped; there are fewer distinct candidates), each
# short (the longest is 5 characters): an unknown name is quoted back in the error.
MAX_CANDIDATE_NAMES = 16
MAX_CANDIDATE_NAME_LENGTH = 32


class NoFeasiblePlan(ValueError):
    """No configuration meets the constraints; ``minimum`` is the least achievable value of ``kind``."""

    def __init__(self, message: str, *, kind: str, limit: float, minimum: float | None) -> None:
        super().__init__(message)
        self.kind = kind
        self.limit = limit
        self.minimum = minimum


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


# ---------------------------------------------------------------------------------------------
# The request


@dataclass(frozen=True)
class PlanRequest:
    """What to plan: method, search, candidates, constraints and measurement settings.

    method: ``hawq_v2`` (diagonal Ω objective) or ``interlayer`` (ΔL = Σ g·Δ + ½ Σ G).
    search: ``pareto`` (whole frontier, best point within the budget) or ``bisection``
    (demotion order, measured; needs ``max_drop``). At most one budget among
    ``max_size_bytes``, ``max_bops`` and ``max_latency_ms``; ``max_drop`` (percentage points)
    may accompany it. ``sensitivity_options`` are further ``InterLayerConfig`` fields
    (``batch_size``, ``trace_max_probes``, ...); bits, seed and device come from the request.
    ``device`` is used for the sensitivity analysis and the latency measurement.
    ``measure_activation_terms``: measure what 8-bit activations cost each layer and add it to
    both objectives; without it ``w8a8`` and ``w8`` (``w4a8`` and ``w4``) are predicted alike.
    ``metric``: what every measurement (and so ``max_drop``) uses, ``auto`` or one of
    ``planner.evaluate.METRICS``; auto picks it from the first output's kind.
    ``exclude``: layer names, node names or fnmatch-style patterns (``*``, ``?``) matched against
    both (a list, or one comma-separated string): those layers stay fp32 in every configuration the
    search considers, the uniform reference points (``measure_uniform``) included, which are "every
    other layer at b". Layers whose weight is a structural constant are restricted as well; see
    ``planner.exclude``. A pattern matching no layer is a ValueError when the plan runs (the model
    is not known here).
    ``sample_axes``: input name -> the axis its samples lie on, or None for an input shared by every
    sample, merged over what the declared input shapes say (``sensitivity.samples``); for models
    whose declared shapes are missing or misleading. An unknown input is a ValueError when the plan runs.
    Every field is checked on construction against the ``MAX_*`` bounds above (a ValueError
    naming the field), whatever JSON value it holds; ints must be ints, numbers finite.
    """

    method: str = "hawq_v2"
    search: str = "pareto"
    candidates: tuple[str, ...] = DEFAULT_CANDIDATES
    max_size_bytes: int | None = None
    max_bops: int | None = None
    max_latency_ms: float | None = None
    max_drop: float | None = None
    seed: int = 0
    sensitivity_options: Mapping[str, Any] = field(default_factory=dict)
    max_frontier_points: int = 8
    measure_uniform: bool = True
    latency_repeats: int = 50
    latency_warmup: int = 10
    latency_batch_size: int = 1
    device: str = "auto"
    solver_time_limit_s: float = 10.0
    measure_activation_terms: bool = True  # add each layer's measured activation cost (planner.activation)
    # What max_drop is measured on (planner.evaluate.METRICS); auto picks it from the model's output kind.
    metric: str = "auto"
    exclude: tuple[str, ...] = ()  # layers kept fp32, by layer or node name or pattern (planner.exclude)
    sample_axes: Mapping[str, int | None] = field(default_factory=dict)  # input -> sample axis (None: shared)

    def __post_init__(self) -> None:
        set_fields(
            self,
            method=check_choice("method", self.method, METHODS),
            search=check_choice("search", self.search, SEARCHES),
            candidates=_check_candidates(self.candidates),
            max_size_bytes=_optional(check_int, "max_size_bytes", self.max_size_bytes, 1, MAX_COST),
            max_bops=_optional(check_int, "max_bops", self.max_bops, 1, MAX_COST),
            max_latency_ms=_optional(
                check_float, "max_latency_ms", self.max_latency_ms, 0.0, MAX_LATENCY_MS, low_open=True
            ),
            max_drop=_optional(check_float, "max_drop", self.max_drop, 0.0, MAX_DROP),
            seed=check_int("seed", self.seed, 0, MAX_SEED),
            max_frontier_points=check_int("max_frontier_points", self.max_frontier_points, 1, MAX_FRONTIER_POINTS),
            measure_uniform=check_bool("measure_uniform", self.measure_uniform),
            latency_repeats=check_int("latency_repeats", self.latency_repeats, 1, MAX_LATENCY_REPEATS),
            latency_warmup=check_int("latency_warmup", self.latency_warmup, 0, MAX_LATENCY_WARMUP),
            latency_batch_size=check_int("latency_batch_size", self.latency_batch_size, 1, MAX_LATENCY_BATCH_SIZE),
            device=check_device("device", self.device),
            solver_time_limit_s=check_float(
                "solver_time_limit_s", self.solver_time_limit_s, 0.0, MAX_SOLVER_TIME_LIMIT_S, low_open=True
            ),
            measure_activation_terms=check_bool("measure_activation_terms", self.measure_activation_terms),
            metric=check_choice("metric", self.metric, METRICS),
            exclude=check_exclude(self.exclude),
            sample_axes=check_sample_axes(self.sample_axes),
            sensitivity_options=_check_sensitivity_options(self.sensitivity_options),
        )
        budgets = [name for name in BUDGET_FIELDS if getattr(self, name) is not None]
        _require(len(budgets) <= 1, f"give at most one budget; got {budgets}")
        bisection = self.search == "bisection"
        _require(not bisection or self.max_drop is not None, "bisection needs max_drop (percentage points)")
        _require(
            not bisection or self.max_latency_ms is None,
            "bisection takes a size or BOPS budget, not max_latency_ms; use search='pareto'",
        )
        self.sensitivity_config()  # validates the options' values

    @property
    def weight_bits(self) -> tuple[int, ...]:
        """The weight bit widths the candidates need Δ for, widest first."""
        bits = {CANDIDATES[name].weight_bits for name in self.candidates} - {None}
        return tuple(sorted(bits, reverse=True))

    @property
    def cost_kind(self) -> str:
        """The cost the search trades against the predicted loss: BOPS for BOPS and latency budgets
        (BOPS is the computed proxy of compute time), else size."""
        return "bops" if self.max_bops is not None or self.max_latency_ms is not None else "size"

    @property
    def budget(self) -> int | None:
        """The computed-cost budget on ``cost_kind`` (None for no budget or a latency budget)."""
        return self.max_size_bytes if self.max_size_bytes is not None else self.max_bops

    def constraints(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in (*BUDGET_FIELDS, "max_drop") if getattr(self, name) is not None}

    def sensitivity_config(self) -> TraceConfig | InterLayerConfig:
        """What the method needs: traces for ``hawq_v2`` (Ω comes from them), inter-layer terms for
        ``interlayer``. Computing the inter-layer terms for every plan took 529 of a 637 s hawq_v2 plan
        on a 224x224 classifier. The options are InterLayerConfig's either way (``trace_*`` names)."""
        bits = self.weight_bits or (8,)  # only fp32 candidates: nothing is quantized, any width will do
        try:
            config = InterLayerConfig(**dict(self.sensitivity_options), bits=bits, seed=self.seed, device=self.device)
        except ValueError as error:
            raise ValueError(f"invalid sensitivity_options: {error}") from None
        return config.trace_config() if self.method == "hawq_v2" else config

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {
            **data,
            "candidates": list(self.candidates),
            "sensitivity_options": dict(self.sensitivity_options),
            "exclude": list(self.exclude),
            "sample_axes": dict(self.sample_axes),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PlanRequest:
        _require(isinstance(data, Mapping), f"a plan request must be a JSON object; got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(key) for key in data if key not in known)  # non-str keys are unknown too
        _require(not unknown, f"unknown plan request keys {shown(unknown)}; known: {sorted(known)}")
        return cls(**data)


def _optional(check: Callable[..., Any], name: str, value: Any, *bounds: Any, **options: Any) -> Any:
    """None (the constraint is not set) or the checked value."""
    return None if value is None else check(name, value, *bounds, **options)


def _check_candidates(value: Any) -> tuple[str, ...]:
    """Candidate names, as a list or a comma-separated string: known, in order, without repeats."""
    names = value.split(",") if isinstance(value, str) else value
    _require(
        isinstance(names, list | tuple)
        and len(names) <= MAX_CANDIDATE_NAMES
        and all(isinstance(name, str) and len(name) <= MAX_CANDIDATE_NAME_LENGTH for name in names),
        f"candidates must be a list of at most {MAX_CANDIDATE_NAMES} candidate names; got {shown(value)}",
    )
    return tuple(candidate.name for candidate in parse_candidates(names))


def _check_sensitivity_options(value: Any) -> dict[str, Any]:
    """A copy (plain data, picklable) of InterLayerConfig fields other than the owned ones; their
    values are checked by building the configuration."""
    _require(isinstance(value, Mapping), f"sensitivity_options must be a mapping; got {type(value).__name__}")
    options = dict(value)
    owned = sorted(name for name in _OWNED_SENSITIVITY_OPTIONS if name in options)
    _require(not owned, f"sensitivity_options must not set {owned}: the request sets them")
    known = {f.name for f in dataclasses.fields(InterLayerConfig)} - set(_OWNED_SENSITIVITY_OPTIONS)
    unknown = sorted(str(key) for key in options if key not in known)
    _require(not unknown, f"invalid sensitivity_options: unknown keys {shown(unknown)}; known: {sorted(known)}")
    return options


# ---------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class Measurement:
    """What the exported configuration measured in onnxruntime."""

    metric_name: str
    metric: float  # percent
    baseline: float  # percent, the float model on the same samples
    drop: float  # percentage points
    num_samples: int
    size_bytes: int  # the artifact's bytes
    sha256: str
    latency: LatencyMeasurement | None
    output_kind: str = ""  # class_scores, embeddings, sequence or dense (planner.evaluate.detect_kind)
    metric_reason: str = ""  # why metric_name: the request's choice or the rule that picked the kind

    def to_dict(self) -> dict[str, Any]:
        latency = self.latency
        return {
            "metric_name": self.metric_name,
            "metric_reason": self.metric_reason,
            "output_kind": self.output_kind,
            "metric": self.metric,
            "baseline": self.baseline,
            "drop": self.drop,
            "num_samples": self.num_samples,
            "size_bytes": self.size_bytes,
            "sha256": self.sha256,
            "latency_ms": None
            if latency is None
            else {
                "mean": latency.mean_ms,
                "p50": latency.p50_ms,
                "p90": latency.p90_ms,
                "batch_size": latency.batch_size,
                "repeats": latency.repeats,
                "device": latency.device_description,
                "provider": latency.provider,
            },
        }


@dataclass(frozen=True)
class PlanPoint:
    """A configuration with its computed costs, both predicted loss changes and, if measured, its measurement."""

    configuration: Mapping[str, str]
    size_bytes: int
    bops: int
    omega: float  # Ω(c), HAWQ-V2's diagonal proxy
    loss_change: float  # ΔL(c) = Σ g·Δ + ½ Σ G
    measured: Measurement | None = None

    def predicted(self) -> dict[str, Any]:
        return {"omega": self.omega, "loss_change": self.loss_change, "size_bytes": self.size_bytes, "bops": self.bops}

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": dict(self.configuration),
            "predicted": self.predicted(),
            "measured": None if self.measured is None else self.measured.to_dict(),
        }


@dataclass(frozen=True)
class PlanResult:
    """What ``plan`` returns (plain picklable data). ``to_dict`` gives JSON data, the artifact by size and sha256."""

    request: PlanRequest
    plan: PlanPoint  # the chosen configuration, always measured
    meets_constraints: bool
    frontier: tuple[PlanPoint, ...]
    uniform: Mapping[str, PlanPoint]  # candidate -> every layer at it
    evaluations: int  # configurations the search exported and evaluated to choose the plan
    search_details: Mapping[str, Any]
    artifact_bytes: bytes = field(repr=False)
    artifact_sha256: str
    sensitivity: Mapping[str, Any] = field(repr=False)
    versions: Mapping[str, str]
    timings: Mapping[str, float]
    activation_terms: Mapping[str, ActivationTerm] = field(default_factory=dict)
    normalization: Mapping[str, Any] = field(default_factory=dict)  # NormalizedModel.to_dict(): what it changed
    # Layers the search could not quantize freely (the request's exclude patterns, structural constants).
    excluded: tuple[Exclusion, ...] = ()
    # Layer name -> {"node_name", "scope"}: exporters name weights anonymously (onnx::MatMul_984).
    layer_nodes: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    @property
    def configuration(self) -> Configuration:
        return Configuration(dict(self.plan.configuration))

    def to_dict(self) -> dict[str, Any]:
        return {
            "request": self.request.to_dict(),
            "plan": self.plan.to_dict(),
            "meets_constraints": self.meets_constraints,
            "frontier": [point.to_dict() for point in self.frontier],
            "uniform": {name: point.to_dict() for name, point in self.uniform.items()},
            "evaluations": self.evaluations,
            "search": dict(self.search_details),
            "artifact": {"sha256": self.artifact_sha256, "size_bytes": len(self.artifact_bytes)},
            "sensitivity": dict(self.sensitivity),
            "activation_terms": {layer: term.to_dict() for layer, term in self.activation_terms.items()},
            "versions": dict(self.versions),
            "timings": dict(self.timings),
            "normalization": dict(self.normalization),
            "excluded": [exclusion.to_dict() for exclusion in self.excluded],
            "layer_nodes": {layer: dict(node) for layer, node in self.layer_nodes.items()},
        }


# ---------------------------------------------------------------------------------------------
# The verb


def plan(
    model: onnx.ModelProto | NormalizedModel,
    calibration: Mapping[str, np.ndarray],
    request: PlanRequest,
    *,
    evaluation: Mapping[str, np.ndarray] | None = None,
    sensitivity: SensitivityResult | None = None,
    progress: Progress | None = None,
) -> PlanResult:
    """Choose, export and measure a mixed-precision configuration of ``model`` (see the module doc).

    ``calibration`` (and ``evaluation``, default: the calibration set) map the model inputs,
    and optionally ``labels``, to arrays with samples on each input's sample axis (axis 0 unless the
    declared shapes or ``request.sample_axes`` say otherwise: ``sensitivity.samples``). ``model`` may already
    be normalised (``normalize_for_plan``: the worker does so before its sensitivity analysis).
    Raises ``ValueError`` for bad input (``UnsupportedOpsError`` for ops the sensitivity analysis
    lacks, ``AlreadyQuantizedError``, ``OpsetUpgradeError``) and ``NoFeasiblePlan`` when no
    configuration meets the constraints.
    """
    progress = progress or _no_progress
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
    _check_budget_feasible(table, request, offered)  # before the costly analysis
    sensitivity = _sensitivity(normalized, calibration, request, sensitivity, progress, timings, axes)
    measurer = _Measurer(normalized, calibration, evaluation, request, progress, axes)
    activation = _activation_terms(model, calibration, request, sensitivity, offered, measurer, timings)
    progress("objective", 0.0, "building the objective")
    objective = build_objective(sensitivity, table, request.candidates, model, activation, offered=offered.offered)

    search_start = time.perf_counter()
    if request.search == "bisection":
        chosen, frontier, details = _bisection(objective, table, request, measurer)
    else:
        chosen, frontier, details = _pareto(objective, table, request, measurer)
    timings["search"] = time.perf_counter() - search_start
    evaluations = measurer.count

    measure_start = time.perf_counter()
    chosen = measurer.measured(chosen)
    frontier = tuple(measurer.measured(p) if measurer.has(p.configuration) else p for p in frontier)
    uniform = _uniform(objective, table, request, measurer) if request.measure_uniform else {}
    timings["measure"] = time.perf_counter() - measure_start
    timings["total"] = time.perf_counter() - start
    artifact = measurer.export(chosen.configuration)
    progress("done", 1.0, f"plan measured: {chosen.measured.metric:.2f} % ({chosen.measured.metric_name})")
    return PlanResult(
        request=request,
        plan=chosen,
        meets_constraints=meets_constraints(chosen, request),
        frontier=_listed(frontier),
        uniform=uniform,
        evaluations=evaluations,
        search_details=details,
        artifact_bytes=artifact.model_bytes,
        artifact_sha256=artifact.sha256,
        sensitivity=sensitivity.to_dict(),
        versions={**sensitivity.versions, **export_versions()},
        timings=timings,
        activation_terms=activation,
        normalization=normalized.to_dict(),
        excluded=offered.exclusions,
        layer_nodes={layer.name: {"node_name": layer.node_name, "scope": layer.scope} for layer in find_layers(model)},
    )


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


def _no_progress(phase: str, fraction: float, message: str) -> None:
    pass


def _fits_size(point: PlanPoint, limit: int) -> bool:
    size = point.size_bytes if point.measured is None else point.measured.size_bytes
    return size <= limit


def meets_constraints(point: PlanPoint, request: PlanRequest) -> bool:
    """Size (the artifact's where measured, else computed) and BOPS within their budget,
    measured latency and drop within theirs."""
    checks = []
    if request.max_size_bytes is not None:
        checks.append(_fits_size(point, request.max_size_bytes))
    if request.max_bops is not None:
        checks.append(point.bops <= request.max_bops)
    measured = point.measured
    if request.max_latency_ms is not None:
        latency = None if measured is None else measured.latency
        checks.append(latency is not None and latency.p50_ms <= request.max_latency_ms)
    if request.max_drop is not None:
        checks.append(measured is not None and measured.drop <= request.max_drop)
    return all(checks)


# ---------------------------------------------------------------------------------------------
# Sensitivity and the objective


def _sensitivity(
    model: NormalizedModel,
    calibration: Mapping[str, np.ndarray],
    request: PlanRequest,
    given: SensitivityResult | None,
    progress: Progress,
    timings: dict[str, float],
    axes: Mapping[str, int | None],
) -> SensitivityResult:
    if given is not None:
        _require(
            request.method != "interlayer" or given.interlayer is not None,
            "method 'interlayer' needs a sensitivity result with inter-layer terms (an InterLayerConfig analysis)",
        )
        return given
    from sensitivity.onnx_program import load_onnx
    from sensitivity.run import compute_sensitivity

    start = time.perf_counter()
    program = load_onnx(model, sample_axes=axes)

    def forward(phase: str, fraction: float, message: str) -> None:
        progress(f"sensitivity:{phase}", fraction, message)

    result = compute_sensitivity(program, calibration, request.sensitivity_config(), forward)
    timings["sensitivity"] = time.perf_counter() - start
    return result


def _activation_terms(
    model: onnx.ModelProto,
    calibration: Mapping[str, np.ndarray],
    request: PlanRequest,
    sensitivity: SensitivityResult,
    offered: LayerCandidates,
    measurer: _Measurer,
    timings: dict[str, float],
) -> dict[str, ActivationTerm]:
    if not request.measure_activation_terms or not any(CANDIDATES[c].quantizes_activations for c in request.candidates):
        return {}
    progress = measurer.progress
    progress("activation", 0.0, "measuring each layer's activation quantization")
    start = time.perf_counter()
    try:
        # Exported through the measurer's cache: the uniform w8a8 baseline reuses this artifact. Excluded
        # layers stay fp32 there too: their terms would only ever apply to candidates they are not offered.
        uniform = measurer.export(offered.uniform("w8a8"))
        terms = activation_terms(
            model,
            calibration,
            sensitivity.loss_kind,
            w8a8_artifact=uniform.model_bytes,
            sample_axes=measurer.sample_axes,
        )
    except ExportError as error:
        # Not fatal: the search can still avoid a8 where it fails, as before these terms existed.
        logger.warning("activation terms skipped: uniform w8a8 does not export (%s)", error)
        progress("activation", 1.0, f"skipped: uniform w8a8 does not export ({error})"[:500])
        return {}
    timings["activation_terms"] = time.perf_counter() - start
    return terms


def _sample_shape(
    model: onnx.ModelProto, calibration: Mapping[str, np.ndarray], axes: Mapping[str, int | None]
) -> dict[str, tuple[int, ...]]:
    """The calibration arrays' shapes with one sample (shared inputs whole): BOPS are counted per sample."""
    return one_sample_shapes(check_inputs(model, calibration, what="calibration set", sample_axes=axes), axes)


def build_objective(
    sensitivity: SensitivityResult,
    table: CostTable,
    candidates: Sequence[str],
    model: onnx.ModelProto | None = None,
    activation: Mapping[str, ActivationTerm] | None = None,
    *,
    offered: Mapping[str, Sequence[str]] | None = None,
) -> Objective:
    """Ω, g·Δ, G and costs (``size``: bytes of the layer's weight; ``bops``) per layer × candidate.

    The terms come from the inter-layer analysis by the candidate's weight bits (fp32 -> 0).
    A result with traces only (a TraceConfig analysis) gives Ω from the traces and the ‖Δ‖²
    of ``model``'s weights, with g·Δ and G zero: enough for ``hawq_v2``, not for ``interlayer``.
    ``activation`` (``planner.activation``): each layer's measured activation term, shrunk by its
    standard error like g·Δ, is added to l and (floored at 0) to Ω of the candidates that
    quantize activations. ``offered``: the candidates of each layer (``planner.exclude``: an
    excluded layer offers fp32 alone); default ``candidates`` for every layer.
    """
    layers = [layer.name for layer in sensitivity.layers]
    missing = sorted(set(table) ^ set(layers))
    _require(not missing, f"the sensitivity result does not match the model's layers (differ: {missing})")
    names_of = (
        {layer: tuple(candidates) for layer in layers}
        if offered is None
        else {layer: tuple(offered[layer]) for layer in layers if layer in offered}
    )
    unoffered = sorted(set(layers) - set(names_of))
    _require(not unoffered, f"offered names no candidates for layers {unoffered[:5]}")
    terms = sensitivity.interlayer
    if terms is None:
        terms = _trace_terms(sensitivity, candidates, model)
    index = terms.index()
    bits_of = {name: candidate.weight_bits for name, candidate in CANDIDATES.items()}
    needed = sorted(
        {(layer, bits_of[c]) for layer in layers for c in names_of[layer] if bits_of[c] is not None} - set(index)
    )
    _require(not needed, f"the sensitivity result lacks terms for (layer, bits) {needed[:5]}; analyse those bit widths")

    gradient_terms = shrunk_gradient_terms(terms)  # a search would otherwise fit their noise

    def with_activation(values: Sequence[float], layer: str, floor: float) -> list[float]:
        term = activation.get(layer) if activation else None
        cost = 0.0 if term is None else max(shrunk(term.loss_change, term.standard_error), floor)
        return [
            (0.0 if bits_of[c] is None else float(values[index[(layer, bits_of[c])]]))
            + (cost if CANDIDATES[c].quantizes_activations else 0.0)
            for c in names_of[layer]
        ]

    flat = [(layer, bits_of[c]) for layer in layers for c in names_of[layer]]
    rows = np.array([-1 if bits is None else index[(layer, bits)] for layer, bits in flat])
    matrix = terms.array()
    G = np.where((rows[:, None] >= 0) & (rows[None, :] >= 0), matrix[np.ix_(rows, rows)], 0.0)
    return Objective(
        layers=tuple(layers),
        candidates=tuple(names_of[layer] for layer in layers),
        # Ω is HAWQ-V2's non-negative proxy (a minimum's loss rises under any perturbation): a
        # measured activation term below 0 is noise to it. l takes the term with its sign, like g·Δ.
        omega=[with_activation(terms.omega, layer, floor=0.0) for layer in layers],
        linear=[with_activation(gradient_terms, layer, floor=-math.inf) for layer in layers],
        G=0.5 * (G + G.T),  # HVP estimates are symmetric only up to round-off
        costs={
            "size": [[layer_size_bytes(table[layer], c) for c in names_of[layer]] for layer in layers],
            "bops": [[layer_bops(table[layer], c) for c in names_of[layer]] for layer in layers],
        },
    )


def _trace_terms(
    sensitivity: SensitivityResult, candidates: Sequence[str], model: onnx.ModelProto | None
) -> InterLayerTerms:
    """Ω from traces and the model's own Δ; g·Δ and G zero (see ``build_objective``)."""
    _require(sensitivity.traces is not None, "the sensitivity result has neither traces nor inter-layer terms")
    _require(model is not None, "a result with traces only needs the model to compute Δ")
    import torch

    from sensitivity.interlayer import omega_trace
    from sensitivity.layers import find_layers, weight_array

    bits = sorted({CANDIDATES[c].weight_bits for c in candidates} - {None}) or [8]
    layers = find_layers(model)
    weights = [torch.from_numpy(weight_array(model, layer.name).astype(np.float32)) for layer in layers]
    deltas = perturbations(layers, weights, bits)
    norms = {label: float(delta.double().pow(2).sum()) for label, delta in deltas.items()}
    average = {trace.name: omega_trace(trace) for trace in sensitivity.traces}
    labels = tuple(deltas)
    return InterLayerTerms(
        labels=labels,
        matrix=tuple(tuple(0.0 for _ in labels) for _ in labels),
        gradient_terms=tuple(0.0 for _ in labels),
        delta_norms_squared=tuple(norms[label] for label in labels),
        omega=tuple(average[name] * norms[(name, b)] for name, b in labels),
        symmetry_error=0.0,
    )


def _point(objective: Objective, table: CostTable, configuration: Mapping[str, str]) -> PlanPoint:
    omega, loss = objective.evaluate(configuration)
    return PlanPoint(
        configuration=dict(configuration),
        size_bytes=int(round(objective.cost(configuration, "size"))) + table.fixed_size_bytes,
        bops=int(round(objective.cost(configuration, "bops"))),
        omega=omega,
        loss_change=loss,
    )


def _layer_budget(table: CostTable, request: PlanRequest) -> float | None:
    """The budget on the objective's per-layer costs (size: minus the bytes outside layers)."""
    if request.budget is None:
        return None
    other = table.fixed_size_bytes if request.cost_kind == "size" else 0
    return float(request.budget - other)


def minimum_cost(
    table: CostTable, candidates: Sequence[str], kind: str, offered: Mapping[str, Sequence[str]] | None = None
) -> int:
    """The computed cost of the cheapest configuration (size includes the bytes outside layers);
    ``offered``: each layer's own candidates (``planner.exclude``), else ``candidates`` for all."""
    cost = layer_size_bytes if kind == "size" else layer_bops
    other = table.fixed_size_bytes if kind == "size" else 0
    names = (lambda layer: candidates) if offered is None else (lambda layer: offered[layer])
    return other + sum(min(cost(entry, c) for c in names(layer)) for layer, entry in table.items())


def _check_budget_feasible(table: CostTable, request: PlanRequest, offered: LayerCandidates) -> None:
    """NoFeasiblePlan naming the minimum achievable cost when the size/BOPS budget is below it."""
    if request.budget is None:
        return
    kind = request.cost_kind
    cheapest = minimum_cost(table, request.candidates, kind, offered.offered)
    if cheapest > request.budget:
        name = "max_size_bytes" if kind == "size" else "max_bops"
        unit = "bytes" if kind == "size" else "BOPS"
        kept = f" ({len(offered.exclusions)} layers excluded)" if offered.exclusions else ""
        raise NoFeasiblePlan(
            f"no configuration meets {name}={request.budget:.6g}: the cheapest with candidates "
            f"{list(request.candidates)}{kept} costs {cheapest:.6g} {unit}",
            kind=name,
            limit=float(request.budget),
            minimum=float(cheapest),
        )


# ---------------------------------------------------------------------------------------------
# Measuring configurations


class _Measurer:
    """Exports and measures configurations once each (cached); counts the distinct ones."""

    def __init__(
        self,
        model: NormalizedModel,
        calibration: Mapping[str, np.ndarray],
        evaluation: Mapping[str, np.ndarray],
        request: PlanRequest,
        progress: Progress,
        sample_axes: Mapping[str, int | None],
    ) -> None:
        self._model = model  # normalised at the export's opset: export_model uses it as it is
        self.sample_axes = dict(sample_axes)  # every input's, resolved (sensitivity.samples)
        self._float_bytes = model.model.SerializeToString()
        self._calibration = calibration
        self._evaluation = evaluation
        self._request = request
        self.progress = progress
        # Every artifact carries the same metadata, so the chosen one is byte-identical to the measured one.
        self._metadata = {REQUEST_METADATA_KEY: json.dumps(request.to_dict(), sort_keys=True)}
        self._exports: dict[Configuration, ExportedModel] = {}
        self._measurements: dict[Configuration, Measurement] = {}

    @property
    def count(self) -> int:
        return len(self._measurements)

    def has(self, configuration: Mapping[str, str]) -> bool:
        return Configuration(dict(configuration)) in self._measurements

    def export(self, configuration: Mapping[str, str]) -> ExportedModel:
        key = Configuration(dict(configuration))
        if key not in self._exports:
            self._exports[key] = export_model(
                self._model,
                key,
                self._calibration,
                metadata=self._metadata,
                constraints=self._request.constraints(),
                sample_axes=self.sample_axes,
            )
        return self._exports[key]

    def measure(self, configuration: Mapping[str, str]) -> Measurement:
        key = Configuration(dict(configuration))
        if key not in self._measurements:
            self.progress("measure", 0.0, f"exporting and evaluating configuration {len(self._measurements) + 1}")
            exported = self.export(key)
            result = evaluate(
                exported, self._float_bytes, self._evaluation, metric=self._request.metric, sample_axes=self.sample_axes
            )
            latency = measure_latency(
                exported.model_bytes,
                self._evaluation,
                device=_latency_device(self._request.device),
                warmup=self._request.latency_warmup,
                repeats=self._request.latency_repeats,
                batch_size=self._request.latency_batch_size,
                sample_axes=self.sample_axes,
            )
            self._measurements[key] = Measurement(
                metric_name=result.metric_name,
                metric=result.metric,
                baseline=result.baseline,
                drop=result.drop,
                num_samples=result.num_samples,
                size_bytes=len(exported.model_bytes),
                sha256=exported.sha256,
                latency=latency,
                output_kind=result.output_kind,
                metric_reason=result.metric_reason,
            )
            self.progress("measure", 1.0, f"{result.metric_name} {result.metric:.2f} % (drop {result.drop:.2f} pp)")
        return self._measurements[key]

    def measured(self, point: PlanPoint) -> PlanPoint:
        return dataclasses.replace(point, measured=self.measure(point.configuration))


def _latency_device(device: str) -> str:
    """The latency module knows auto, cpu and cuda; a numbered CUDA device counts as cuda."""
    return "cuda" if device.startswith("cuda") else device


def _evenly(points: Sequence[PlanPoint], count: int) -> list[PlanPoint]:
    """At most ``count`` points spread evenly, keeping the first and the last."""
    if len(points) <= count:
        return list(points)
    picks = np.unique(np.linspace(0, len(points) - 1, count).round().astype(int))
    return [points[k] for k in picks]


def _listed(frontier: Sequence[PlanPoint]) -> tuple[PlanPoint, ...]:
    """The frontier thinned to ``MAX_LISTED_FRONTIER`` points, keeping every measured one."""
    if len(frontier) <= MAX_LISTED_FRONTIER:
        return tuple(frontier)
    measured = [k for k, p in enumerate(frontier) if p.measured is not None]
    spread = np.linspace(0, len(frontier) - 1, max(MAX_LISTED_FRONTIER - len(measured), 2)).round().astype(int)
    return tuple(frontier[k] for k in sorted(set(spread.tolist()) | set(measured)))


def _uniform(objective: Objective, table: CostTable, request: PlanRequest, measurer: _Measurer) -> dict[str, PlanPoint]:
    """Each candidate b at every layer that offers it (excluded layers stay fp32: ``Objective.uniform``)."""
    return {name: measurer.measured(_point(objective, table, objective.uniform(name))) for name in request.candidates}


# ---------------------------------------------------------------------------------------------
# Searches


def _frontier_points(
    objective: Objective, table: CostTable, request: PlanRequest
) -> tuple[list[PlanPoint], dict[str, Any]]:
    """The (cost, predicted loss) frontier by increasing cost: exact DP on Ω, or the quadratic solver on ΔL."""
    kind = request.cost_kind
    if request.method == "hawq_v2":
        frontier = diagonal_frontier(objective, kind)
        configurations = [objective.configuration(point.choice) for point in frontier]
        details = {"solver": "diagonal-dp", "points": len(frontier)}
    else:
        results = quadratic_frontier(objective, kind, time_limit=request.solver_time_limit_s)
        configurations = [objective.configuration(result.choice) for result in results]
        details = {
            "solver": "quadratic",
            "points": len(results),
            "proven_optimal": all(result.proven_optimal for result in results),
            "max_relative_gap": max((result.relative_gap for result in results), default=0.0),
        }
    return [_point(objective, table, c) for c in configurations], details


def _value(point: PlanPoint, method: str) -> float:
    return point.omega if method == "hawq_v2" else point.loss_change


def _best_within_budget(
    objective: Objective, table: CostTable, request: PlanRequest
) -> tuple[PlanPoint, dict[str, Any]]:
    """The least predicted loss within the computed-cost budget, solved exactly for that budget."""
    kind, budget = request.cost_kind, _layer_budget(table, request)
    if budget is None:
        budget = float(sum(row.max() for row in objective.cost_table(kind)))
    try:
        if request.method == "hawq_v2":
            choice, details = solve_budget(objective, kind, budget).choice, {}
        else:
            result = solve_quadratic(objective, kind, budget, time_limit=request.solver_time_limit_s)
            choice = result.choice
            details = {
                "budget_solver": result.method,
                "lower_bound": result.lower_bound,
                "gap": result.gap,
                "proven_optimal": result.proven_optimal,
            }
    except InfeasibleBudget as error:  # checked up front already; kept so a rounding difference still reads clearly
        name = "max_size_bytes" if kind == "size" else "max_bops"
        raise NoFeasiblePlan(str(error), kind=name, limit=float(request.budget), minimum=error.min_cost) from None
    return _point(objective, table, objective.configuration(choice)), details


def _pareto(
    objective: Objective, table: CostTable, request: PlanRequest, measurer: _Measurer
) -> tuple[PlanPoint, list[PlanPoint], dict[str, Any]]:
    """Frontier, then: the best point within the budget; with max_drop or a latency budget,
    the best measured frontier point meeting them."""
    measurer.progress("search", 0.0, f"building the {request.method} frontier")
    frontier, details = _frontier_points(objective, table, request)
    best, best_details = _best_within_budget(objective, table, request)
    details.update(best_details)
    frontier = _with_point(frontier, best, request.cost_kind)
    budget = request.budget
    eligible = [p for p in frontier if budget is None or _cost_of(p, request.cost_kind) <= budget]
    # Measure an even spread of the eligible points, always including the predicted best.
    to_measure = _with_point(_evenly(eligible, max(request.max_frontier_points - 1, 1)), best, request.cost_kind)
    for k, point in enumerate(to_measure):
        measurer.progress("search", k / len(to_measure), f"measuring frontier point {k + 1}/{len(to_measure)}")
        measurer.measure(point.configuration)
    best = _artifact_within_size(objective, table, request, measurer, best, details)
    frontier = _with_point(frontier, best, request.cost_kind)
    measured = [measurer.measured(p) for p in _with_point(to_measure, best, request.cost_kind)]
    if request.max_size_bytes is not None:
        measured = [p for p in measured if _fits_size(p, request.max_size_bytes)] or measured
    details["measured_points"] = len(measured)
    if request.max_latency_ms is None and request.max_drop is None:
        return best, frontier, details
    if request.max_latency_ms is not None:
        measured = _within_latency(measured, request)
    if request.max_drop is not None:
        details["chosen_by"] = "cheapest measured point within max_drop"
        return _choose_by_drop(measured, request), frontier, details
    details["chosen_by"] = "least predicted loss among the measured points within max_latency_ms"
    return min(measured, key=lambda p: _value(p, request.method)), frontier, details


def _artifact_within_size(
    objective: Objective,
    table: CostTable,
    request: PlanRequest,
    measurer: _Measurer,
    best: PlanPoint,
    details: dict[str, Any],
) -> PlanPoint:
    """``best`` when its artifact fits ``max_size_bytes``; else the best point within a budget
    shrunk by the artifact's excess over its computed size, up to ``SIZE_RETRIES`` times (the
    last point tried is returned; ``meets_constraints`` then says it does not fit)."""
    limit = request.max_size_bytes
    if limit is None:
        return best
    for retry in range(SIZE_RETRIES + 1):
        artifact = measurer.measure(best.configuration).size_bytes
        details["size_retries"] = retry
        if artifact <= limit or retry == SIZE_RETRIES:
            return best
        budget = best.size_bytes - (artifact - limit)
        if budget < 1:
            return best
        measurer.progress(
            "search",
            1.0,
            f"the artifact is {artifact - limit} bytes above max_size_bytes: "
            f"searching again within {budget} computed bytes",
        )
        try:
            best, _ = _best_within_budget(objective, table, dataclasses.replace(request, max_size_bytes=budget))
        except NoFeasiblePlan:
            return best
    return best


def _with_point(points: Sequence[PlanPoint], extra: PlanPoint, kind: str) -> list[PlanPoint]:
    """``points`` plus ``extra`` (if its configuration is new), by increasing cost ``kind``."""
    if any(p.configuration == extra.configuration for p in points):
        return list(points)
    return sorted([*points, extra], key=lambda p: _cost_of(p, kind))


def _cost_of(point: PlanPoint, kind: str) -> int:
    return point.size_bytes if kind == "size" else point.bops


def _within_latency(measured: Sequence[PlanPoint], request: PlanRequest) -> list[PlanPoint]:
    """Latency is measured, not predicted: the measured frontier points (BOPS frontier) whose
    measured median latency (robust to scheduling noise, unlike the mean) is within the budget."""
    fast = [p for p in measured if p.measured.latency.p50_ms <= request.max_latency_ms]
    if not fast:
        fastest = min(p.measured.latency.p50_ms for p in measured)
        raise NoFeasiblePlan(
            f"no measured configuration meets max_latency_ms={request.max_latency_ms:g}: the fastest of "
            f"{len(measured)} measured frontier points has a median latency of {fastest:.4g} ms",
            kind="max_latency_ms",
            limit=float(request.max_latency_ms),
            minimum=fastest,
        )
    return fast


def _choose_by_drop(measured: Sequence[PlanPoint], request: PlanRequest) -> PlanPoint:
    """The cheapest measured point whose drop is within max_drop."""
    good = [p for p in measured if p.measured.drop <= request.max_drop]
    if not good:
        least = min(p.measured.drop for p in measured)
        raise NoFeasiblePlan(
            f"no measured configuration meets max_drop={request.max_drop:g} pp within the constraints: "
            f"the least drop among {len(measured)} measured points is {least:.4g} pp",
            kind="max_drop",
            limit=float(request.max_drop),
            minimum=least,
        )
    return min(good, key=lambda p: (_cost_of(p, request.cost_kind), _value(p, request.method)))


def bisection_candidates(objective: Objective, request: PlanRequest) -> tuple[str, str]:
    """(low, high): demote from the most expensive candidate (fp32 when offered) to the cheapest
    one in the search's cost (ties: fewer BOPS, then fewer bits of activation)."""
    names = request.candidates
    kind = request.cost_kind

    def total(name: str, cost: str) -> float:
        return objective.cost(objective.uniform(name), cost)

    low = min(names, key=lambda n: (total(n, kind), total(n, "bops"), names.index(n)))
    high = "fp32" if "fp32" in names else max(names, key=lambda n: (total(n, kind), total(n, "bops")))
    _require(low != high, f"bisection needs two candidates of different cost; got {list(names)}")
    return low, high


def _bisection(
    objective: Objective, table: CostTable, request: PlanRequest, measurer: _Measurer
) -> tuple[PlanPoint, list[PlanPoint], dict[str, Any]]:
    """Demotion order by predicted sensitivity per cost saved; binary search measured for real.
    The measured steps are the frontier."""
    low, high = bisection_candidates(objective, request)
    ordering = "diagonal" if request.method == "hawq_v2" else "interlayer"
    measurer.progress("search", 0.0, f"bisection: demoting {high} -> {low} ({ordering} order)")
    result = bisect(
        objective,
        request.cost_kind,
        lambda configuration: measurer.measure(configuration).drop,
        request.max_drop,
        low=low,
        high=high,
        ordering=ordering,
    )
    steps = sorted({step.k: step for step in result.steps}.values(), key=lambda step: -step.k)
    frontier = [measurer.measured(_point(objective, table, step.configuration)) for step in steps]
    chosen = measurer.measured(_point(objective, table, result.configuration))
    details = {
        "solver": "bisection",
        "low": low,
        "high": high,
        "ordering": ordering,
        "order": list(result.order),
        "demoted": result.best.k,
        "within_tolerance": result.within_tolerance,
        "steps": [{"k": step.k, "drop": step.drop, "cost": step.cost} for step in result.steps],
    }
    if not result.within_tolerance:
        raise NoFeasiblePlan(
            f"no measured configuration meets max_drop={request.max_drop:g} pp: even the undemoted "
            f"configuration drops {result.best.drop:.4g} pp",
            kind="max_drop",
            limit=float(request.max_drop),
            minimum=result.best.drop,
        )
    if request.budget is not None and _cost_of(chosen, request.cost_kind) > request.budget:
        cheapest = min(_cost_of(p, request.cost_kind) for p in frontier if p.measured.drop <= request.max_drop)
        raise NoFeasiblePlan(
            f"bisection found no configuration within both max_drop={request.max_drop:g} pp and the "
            f"{request.cost_kind} budget {request.budget:.6g}: the cheapest measured one within the drop "
            f"costs {cheapest:.6g}",
            kind="max_size_bytes" if request.cost_kind == "size" else "max_bops",
            limit=float(request.budget),
            minimum=float(cheapest),
        )
    return chosen, frontier, details

"""What to plan: ``PlanRequest``, its bounds and its checks (the first step of ``planner.plan``).

A request is checked whole on construction, whatever JSON value each field holds, so every later
step of the pipeline reads valid settings. Which layers its ``exclude`` patterns match and which
inputs its ``sample_axes`` name are checked when the plan runs (the model is not known here).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from planner.candidates import CANDIDATES, parse_candidates
from planner.checks import require
from planner.evaluate import METRICS
from planner.exclude import check_exclude
from sensitivity.checks import check_bool, check_choice, check_float, check_int, set_fields, shown
from sensitivity.results import (
    MAX_SEED,
    MEASURABLE_CANDIDATES,
    FisherConfig,
    InterLayerConfig,
    MeasuredConfig,
    TraceConfig,
    check_device,
)
from sensitivity.samples import check_sample_axes

METHODS = ("hawq_v2", "interlayer", "fisher", "measured")
# The methods whose objective is diagonal (Ω per layer and candidate, no cross-layer term): searched
# by the exact DP on Ω. fisher's Ωᵢ(c) is Σ Fᵢᵢ Δᵢ², twice its predicted loss change, as HAWQ-V2's Ω.
# measured's Ωᵢ(c) is twice layer i's loss change measured alone at candidate c (planner.measured).
DIAGONAL_METHODS = ("hawq_v2", "fisher", "measured")
# Chosen by rank fidelity on held-out data (docs/search.md, "Defaults by evidence"): each layer measured
# alone ranked single layers best on all six models run (Spearman +0.84 to +1.00; HAWQ-V2 traces +0.50 to +0.98).
DEFAULT_METHOD = "measured"
# The methods whose analysis runs Hutchinson probes: the only ones the trace_* options reach.
PROBING_METHODS = ("hawq_v2", "interlayer")
SEARCHES = ("pareto", "bisection")
# The models every plan is compared with; ``baseline`` picks the one max_drop is measured against
# (planner.result.BASELINES says the same: request cannot import result, result imports request).
BASELINES = ("fp32", "fp16")
# What a search optimises among the configurations within the constraints: the predicted loss, or the
# latency measured against the float model (``planner.latency_table``; never a configuration slower
# than float).
OBJECTIVES = ("loss", "latency")
DEFAULT_CANDIDATES = ("fp32", "w8a8", "w4a8", "w8", "w4")
BUDGET_FIELDS = ("max_size_bytes", "max_bops", "max_latency_ms")
# Options the request sets itself; the rest of InterLayerConfig's fields may be given.
_OWNED_SENSITIVITY_OPTIONS = ("bits", "seed", "device")

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


@dataclass(frozen=True)
class PlanRequest:
    """What to plan: method, search, candidates, constraints and measurement settings.

    method: ``hawq_v2`` (diagonal Ω objective), ``interlayer`` (ΔL = Σ g·Δ + ½ Σ G) or ``fisher``
    (diagonal Ω = Σ Fᵢᵢ Δᵢ² from the empirical Fisher, ``sensitivity.fisher``) or ``measured``
    (diagonal Ω = 2ΔL of each layer quantized alone to each candidate in onnxruntime, ``planner.measured``).
    search: ``pareto`` (whole frontier, best point within the budget) or ``bisection``
    (demotion order, measured; needs ``max_drop``). objective: ``loss`` (the least predicted loss
    within the constraints) or ``latency`` (the fastest configuration measured against the float
    model, interleaved, within the constraints, never one measured slower than float; the search's
    cost axis is the latency table's predicted latency, ``planner.latency_table``). At most one budget among
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
    ``baseline``: ``fp32`` (the float model) or ``fp16`` (every layer at fp16): what ``max_drop`` is
    measured against. Both are measured with every plan and every measured point states its drop and
    latency ratio against each (``Measurement.against``).
    ``sample_axes``: input name -> the axis its samples lie on, or None for an input shared by every
    sample, merged over what the declared input shapes say (``sensitivity.samples``); for models
    whose declared shapes are missing or misleading. An unknown input is a ValueError when the plan runs.
    Every field is checked on construction against the ``MAX_*`` bounds above (a ValueError
    naming the field), whatever JSON value it holds; ints must be ints, numbers finite.
    """

    method: str = DEFAULT_METHOD
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
    baseline: str = "fp32"  # what max_drop is measured against: the float model or every layer at fp16
    objective: str = "loss"  # "latency": the fastest measured configuration within the constraints

    def __post_init__(self) -> None:
        set_fields(
            self,
            method=check_choice("method", self.method, METHODS),
            objective=check_choice("objective", self.objective, OBJECTIVES),
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
            baseline=check_choice("baseline", self.baseline, BASELINES),
            sensitivity_options=_check_sensitivity_options(self.sensitivity_options),
        )
        budgets = [name for name in BUDGET_FIELDS if getattr(self, name) is not None]
        require(len(budgets) <= 1, f"give at most one budget; got {budgets}")
        bisection = self.search == "bisection"
        require(not bisection or self.max_drop is not None, "bisection needs max_drop (percentage points)")
        require(
            not bisection or self.max_latency_ms is None,
            "bisection takes a size or BOPS budget, not max_latency_ms; use search='pareto'",
        )
        probe_options = sorted(name for name in self.sensitivity_options if name.startswith("trace_"))
        require(
            self.method in PROBING_METHODS or not probe_options,
            f"invalid sensitivity_options: {probe_options} bound Hutchinson probes, which method "
            f"{self.method!r} does not run",
        )
        self.sensitivity_config()  # validates the options' values

    @property
    def weight_bits(self) -> tuple[int, ...]:
        """The weight bit widths the candidates need Δ for, widest first."""
        weight_bits = (CANDIDATES[name].weight_bits for name in self.candidates)
        return tuple(sorted({bits for bits in weight_bits if bits is not None}, reverse=True))

    @property
    def cost_kind(self) -> str:
        """The cost the search trades against the predicted loss: the budget's kind (size, BOPS, or
        latency predicted by the latency table); without a budget, latency for the latency objective,
        else size."""
        if self.max_size_bytes is not None:
            return "size"
        if self.max_bops is not None:
            return "bops"
        return "latency" if self.max_latency_ms is not None or self.objective == "latency" else "size"

    @property
    def budget(self) -> float | None:
        """The budget on ``cost_kind``: bytes, BOPS or milliseconds (None without one)."""
        for name in BUDGET_FIELDS:
            value = getattr(self, name)
            if value is not None:
                return float(value)
        return None

    @property
    def needs_latency_table(self) -> bool:
        """Whether the search reads predicted latency (``planner.latency_table``)."""
        return self.cost_kind == "latency"

    def constraints(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in (*BUDGET_FIELDS, "max_drop") if getattr(self, name) is not None}

    @property
    def diagonal(self) -> bool:
        """Whether the method's objective is diagonal (searched on Ω)."""
        return self.method in DIAGONAL_METHODS

    def sensitivity_config(self) -> TraceConfig | InterLayerConfig | FisherConfig | MeasuredConfig:
        """What the method needs: traces for ``hawq_v2`` (Ω comes from them), inter-layer terms for
        ``interlayer``. Computing the inter-layer terms for every plan took 529 of a 637 s hawq_v2 plan
        on a 224x224 classifier. The options are InterLayerConfig's either way (``trace_*`` names)."""
        bits = self.weight_bits or (8,)  # only fp32 candidates: nothing is quantized, any width will do
        try:
            config = InterLayerConfig(**dict(self.sensitivity_options), bits=bits, seed=self.seed, device=self.device)
        except ValueError as error:
            raise ValueError(f"invalid sensitivity_options: {error}") from None
        if self.method == "fisher":
            return fisher_config(config)
        if self.method == "measured":
            return measured_config(config, self.candidates)
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
        require(isinstance(data, Mapping), f"a plan request must be a JSON object; got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(key) for key in data if key not in known)  # non-str keys are unknown too
        require(not unknown, f"unknown plan request keys {shown(unknown)}; known: {sorted(known)}")
        return cls(**data)


def fisher_config(config: InterLayerConfig) -> FisherConfig:
    """The Fisher analysis with the inter-layer configuration's shared settings and bits (its
    ``trace_*`` settings have nothing to bound there)."""
    shared = {f.name: getattr(config, f.name) for f in dataclasses.fields(FisherConfig)}
    try:
        return FisherConfig(**shared)
    except ValueError as error:
        raise ValueError(f"invalid sensitivity_options: {error}") from None


def measured_config(config: InterLayerConfig, candidates: Sequence[str]) -> MeasuredConfig:
    """The measured analysis with the inter-layer configuration's shared settings, for the quantized
    ``candidates`` (w8 when there are none: only fp32 is offered, nothing is searched)."""
    own = ("candidates", "quantity")  # quantity: MeasuredConfig's default, auto (KL where the output allows)
    shared = {f.name: getattr(config, f.name) for f in dataclasses.fields(MeasuredConfig) if f.name not in own}
    quantized = tuple(c for c in candidates if c in MEASURABLE_CANDIDATES) or ("w8",)
    try:
        return MeasuredConfig(**shared, candidates=quantized)
    except ValueError as error:
        raise ValueError(f"invalid sensitivity_options: {error}") from None


def _optional(check: Callable[..., Any], name: str, value: Any, *bounds: Any, **options: Any) -> Any:
    """None (the constraint is not set) or the checked value."""
    return None if value is None else check(name, value, *bounds, **options)


def _check_candidates(value: Any) -> tuple[str, ...]:
    """Candidate names, as a list or a comma-separated string: known, in order, without repeats."""
    names = value.split(",") if isinstance(value, str) else value
    require(
        isinstance(names, list | tuple)
        and len(names) <= MAX_CANDIDATE_NAMES
        and all(isinstance(name, str) and len(name) <= MAX_CANDIDATE_NAME_LENGTH for name in names),
        f"candidates must be a list of at most {MAX_CANDIDATE_NAMES} candidate names; got {shown(value)}",
    )
    return tuple(candidate.name for candidate in parse_candidates(names))


def _check_sensitivity_options(value: Any) -> dict[str, Any]:
    """A copy (plain data, picklable) of InterLayerConfig fields other than the owned ones; their
    values are checked by building the configuration."""
    require(isinstance(value, Mapping), f"sensitivity_options must be a mapping; got {type(value).__name__}")
    options = dict(value)
    owned = sorted(name for name in _OWNED_SENSITIVITY_OPTIONS if name in options)
    require(not owned, f"sensitivity_options must not set {owned}: the request sets them")
    known = {f.name for f in dataclasses.fields(InterLayerConfig)} - set(_OWNED_SENSITIVITY_OPTIONS)
    unknown = sorted(str(key) for key in options if key not in known)
    require(not unknown, f"invalid sensitivity_options: unknown keys {shown(unknown)}; known: {sorted(known)}")
    return options

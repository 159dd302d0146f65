"""The plan's data: ``Measurement``, ``PlanPoint``, ``PlanRun`` and ``PlanResult`` (the last step of ``planner.plan``).

Each converts to plain JSON data with ``to_dict()`` and back with ``from_dict()`` (never pickle).
``Measurement``, ``PlanPoint`` and ``PlanResult`` documents carry their format, as the objective's
does (``planner.objective.FORMAT``); the objects nested in them are read as part of it. ``from_dict``
refuses another format, an unknown or missing key and a value of the wrong type with a ValueError
that names it (``planner.checks``), so a document written by another version is never misread.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from planner.activation import ActivationTerm
from planner.candidates import Configuration
from planner.checks import (
    flag,
    integer,
    json_list,
    json_object,
    mapping,
    real,
    real_mapping,
    require,
    text,
    text_mapping,
)
from planner.exclude import Exclusion
from planner.latency import LatencyMeasurement, faster_than_reference, slower_than_reference
from planner.request import PlanRequest

MEASUREMENT_FORMAT = "mpq.measurement/1"
PLAN_POINT_FORMAT = "mpq.plan_point/1"
PLAN_RESULT_FORMAT = "mpq.plan_result/1"
# The frontier listed in a result is thinned to this many points (always keeping the measured
# ones): a DP frontier of a large model can have many thousands of points.
MAX_LISTED_FRONTIER = 256

# The keys of each JSON object (besides "format"), in to_dict's order
_MEASUREMENT_KEYS = (
    "metric_name",
    "metric_reason",
    "output_kind",
    "metric",
    "baseline",
    "drop",
    "num_samples",
    "size_bytes",
    "sha256",
    "latency_ms",
)
# Added later: documents stored before interleaved timing or baselines lack them (read as None: no
# ratios, no comparisons).
_MEASUREMENT_OPTIONAL_KEYS = ("latency_ratio_to_float", "latency_ratio_spread", "float_latency_p50_ms", "against")
_COMPARISON_KEYS = ("metric", "drop", "latency_ratio", "size_ratio")
_LATENCY_KEYS = ("mean", "p50", "p90", "batch_size", "repeats", "device", "provider", "onnxruntime_version")
_POINT_KEYS = ("layers", "predicted", "measured")
_PREDICTED_KEYS = ("omega", "loss_change", "size_bytes", "bops")
_RUN_KEYS = ("versions", "timings", "evaluations", "search", "normalization")
_RESULT_KEYS = (
    "request",
    "plan",
    "meets_constraints",
    "frontier",
    "uniform",
    "artifact",
    "sensitivity",
    "activation_terms",
    "excluded",
    "layer_nodes",
    "run",
)
# slower_than_float is derived from the plan's measurement, written for readers of the JSON (API,
# dashboard); it and baselines are absent from older results.
_RESULT_OPTIONAL_KEYS = ("slower_than_float", "baselines")
# The models every plan is compared with (PlanRequest.baseline picks the one max_drop is measured
# against): the float model, and every layer at fp16 (planner.float16).
BASELINES = ("fp32", "fp16")


@dataclass(frozen=True)
class Comparison:
    """A measured configuration against a baseline model measured the same way (same samples,
    metric and latency settings)."""

    metric: float  # the baseline model's metric, percent
    drop: float  # the baseline's metric − this configuration's, percentage points
    latency_ratio: float | None  # p50 latency / the baseline's p50 (below 1: faster); None unmeasured
    size_ratio: float  # artifact bytes / the baseline's artifact bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "drop": self.drop,
            "latency_ratio": self.latency_ratio,
            "size_ratio": self.size_ratio,
        }

    @classmethod
    def from_dict(cls, data: Any, what: str) -> Comparison:
        fields = json_object(data, what, _COMPARISON_KEYS)
        ratio = fields["latency_ratio"]
        return cls(
            metric=real(f"{what}.metric", fields["metric"]),
            drop=real(f"{what}.drop", fields["drop"]),
            latency_ratio=None if ratio is None else real(f"{what}.latency_ratio", ratio),
            size_ratio=real(f"{what}.size_ratio", fields["size_ratio"]),
        )


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
    output_kind: str = ""  # class_scores, embeddings, sequence or dense (sensitivity.outputs.detect_kind)
    metric_reason: str = ""  # why metric_name: the request's choice or the rule that picked the kind
    # Latency relative to the float model timed interleaved with it in the same run
    # (planner.latency.compare_latency): decisions use these, not ms from separate runs. None in
    # measurements stored before it.
    ratio_to_float: float | None = None  # median over rounds of this model's time / the float model's; < 1 faster
    ratio_spread: float | None = None  # half-width of the ratio's 90 % interval
    float_p50_ms: float | None = None  # the float model's median in the same run
    # Baseline name (BASELINES) -> this configuration against that model; ``drop`` and ``baseline``
    # above are against the float model, as before baselines existed.
    against: Mapping[str, Comparison] = field(default_factory=dict)

    @property
    def slower_than_float(self) -> bool:
        """Measured slower than the float model beyond the ratio's spread (False when not measured so)."""
        if self.ratio_to_float is None or self.ratio_spread is None:
            return False
        return slower_than_reference(self.ratio_to_float, self.ratio_spread)

    @property
    def faster_than_float(self) -> bool:
        """Measured faster than the float model beyond the ratio's spread: the only ground for "faster"."""
        if self.ratio_to_float is None or self.ratio_spread is None:
            return False
        return faster_than_reference(self.ratio_to_float, self.ratio_spread)

    def drop_against(self, baseline: str) -> float:
        """The drop against ``baseline`` (``fp32``: ``drop``); a ValueError when it was not measured."""
        if baseline == "fp32":
            return self.drop
        require(baseline in self.against, f"no {baseline} baseline was measured for this configuration")
        return self.against[baseline].drop

    def compared(self, baselines: Mapping[str, Measurement]) -> Measurement:
        """This measurement with its comparisons against each of ``baselines``."""
        return dataclasses.replace(
            self, against={name: _comparison(self, baseline) for name, baseline in baselines.items()}
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": MEASUREMENT_FORMAT,
            "metric_name": self.metric_name,
            "metric_reason": self.metric_reason,
            "output_kind": self.output_kind,
            "metric": self.metric,
            "baseline": self.baseline,
            "drop": self.drop,
            "num_samples": self.num_samples,
            "size_bytes": self.size_bytes,
            "sha256": self.sha256,
            "latency_ms": None if self.latency is None else _latency_to_dict(self.latency),
            "latency_ratio_to_float": self.ratio_to_float,
            "latency_ratio_spread": self.ratio_spread,
            "float_latency_p50_ms": self.float_p50_ms,
            "against": {name: comparison.to_dict() for name, comparison in self.against.items()},
        }

    @classmethod
    def from_dict(cls, data: Any) -> Measurement:
        fields = json_object(data, "a measurement", _MEASUREMENT_KEYS, MEASUREMENT_FORMAT, _MEASUREMENT_OPTIONAL_KEYS)
        latency = fields["latency_ms"]
        against = {} if fields["against"] is None else mapping("against", fields["against"])
        return cls(
            metric_name=text("metric_name", fields["metric_name"]),
            metric=real("metric", fields["metric"]),
            baseline=real("baseline", fields["baseline"]),
            drop=real("drop", fields["drop"]),
            num_samples=integer("num_samples", fields["num_samples"]),
            size_bytes=integer("size_bytes", fields["size_bytes"]),
            sha256=text("sha256", fields["sha256"]),
            latency=None if latency is None else _latency_from_dict(latency),
            output_kind=text("output_kind", fields["output_kind"]),
            metric_reason=text("metric_reason", fields["metric_reason"]),
            ratio_to_float=_optional_real("latency_ratio_to_float", fields["latency_ratio_to_float"]),
            ratio_spread=_optional_real("latency_ratio_spread", fields["latency_ratio_spread"]),
            float_p50_ms=_optional_real("float_latency_p50_ms", fields["float_latency_p50_ms"]),
            against={name: Comparison.from_dict(value, f"against[{name!r}]") for name, value in _baselines(against)},
        )


def _optional_real(what: str, value: Any) -> float | None:
    return None if value is None else real(what, value)


def _baselines(data: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """The entries of a mapping keyed by baseline name, once every name is one of BASELINES."""
    unknown = sorted(str(name) for name in data if name not in BASELINES)
    require(not unknown, f"unknown baseline(s) {unknown}; known: {list(BASELINES)}")
    return list(data.items())


def _comparison(measured: Measurement, baseline: Measurement) -> Comparison:
    return Comparison(
        metric=baseline.metric,
        drop=baseline.metric - measured.metric,
        latency_ratio=_latency_ratio(measured, baseline),
        size_ratio=measured.size_bytes / baseline.size_bytes,
    )


def _latency_ratio(measured: Measurement, baseline: Measurement) -> float | None:
    """p50 of ``measured`` over ``baseline``'s: the quotient of their ratios to the float model where both
    were timed interleaved with it (each ratio from one run, so machine load cancels), else of their
    p50s from separate runs (older measurements)."""
    if measured.ratio_to_float is not None and baseline.ratio_to_float is not None:
        return measured.ratio_to_float / baseline.ratio_to_float
    latency, reference = measured.latency, baseline.latency
    return None if latency is None or reference is None else latency.p50_ms / reference.p50_ms


def _latency_to_dict(latency: LatencyMeasurement) -> dict[str, Any]:
    return {
        "mean": latency.mean_ms,
        "p50": latency.p50_ms,
        "p90": latency.p90_ms,
        "batch_size": latency.batch_size,
        "repeats": latency.repeats,
        "device": latency.device_description,
        "provider": latency.provider,
        "onnxruntime_version": latency.onnxruntime_version,
    }


def _latency_from_dict(data: Any) -> LatencyMeasurement:
    fields = json_object(data, "a latency measurement", _LATENCY_KEYS)
    return LatencyMeasurement(
        mean_ms=real("latency_ms.mean", fields["mean"]),
        p50_ms=real("latency_ms.p50", fields["p50"]),
        p90_ms=real("latency_ms.p90", fields["p90"]),
        batch_size=integer("latency_ms.batch_size", fields["batch_size"]),
        repeats=integer("latency_ms.repeats", fields["repeats"]),
        device_description=text("latency_ms.device", fields["device"]),
        provider=text("latency_ms.provider", fields["provider"]),
        onnxruntime_version=text("latency_ms.onnxruntime_version", fields["onnxruntime_version"]),
    )


@dataclass(frozen=True)
class PlanPoint:
    """A configuration with its computed costs, both predicted loss changes and, if measured, its measurement."""

    configuration: Mapping[str, str]
    size_bytes: int
    bops: int
    omega: float  # Ω(c), HAWQ-V2's diagonal proxy
    loss_change: float  # ΔL(c) = Σ g·Δ + ½ Σ G
    measured: Measurement | None = None
    # Predicted by the latency table (planner.latency_table) where the search had one; never a measurement.
    latency_ms: float | None = None

    def predicted(self) -> dict[str, Any]:
        figures = {
            "omega": self.omega,
            "loss_change": self.loss_change,
            "size_bytes": self.size_bytes,
            "bops": self.bops,
        }
        return figures if self.latency_ms is None else {**figures, "latency_ms": self.latency_ms}

    @property
    def measured_slower_than_float(self) -> bool:
        """Measured slower than the float model (``Measurement.slower_than_float``), unless it quantizes
        nothing: the float configuration is the float model, and its ratio only times the exporter's
        preprocessing and the noise (the mixed test model's read 1.06 +- 0.05 at load average 7)."""
        if self.measured is None or all(candidate == "fp32" for candidate in self.configuration.values()):
            return False
        return self.measured.slower_than_float

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_POINT_FORMAT,
            "layers": dict(self.configuration),
            "predicted": self.predicted(),
            "measured": None if self.measured is None else self.measured.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Any) -> PlanPoint:
        fields = json_object(data, "a plan point", _POINT_KEYS, PLAN_POINT_FORMAT)
        figures = fields["predicted"]
        keys = (
            (*_PREDICTED_KEYS, "latency_ms")
            if isinstance(figures, Mapping) and "latency_ms" in figures
            else _PREDICTED_KEYS
        )
        predicted = json_object(figures, "a plan point's predicted figures", keys)
        latency = predicted.get("latency_ms")
        measured = fields["measured"]
        return cls(
            configuration=text_mapping("layers", fields["layers"]),
            size_bytes=integer("predicted.size_bytes", predicted["size_bytes"]),
            bops=integer("predicted.bops", predicted["bops"]),
            omega=real("predicted.omega", predicted["omega"]),
            loss_change=real("predicted.loss_change", predicted["loss_change"]),
            measured=None if measured is None else Measurement.from_dict(measured),
            latency_ms=None if latency is None else real("predicted.latency_ms", latency),
        )


@dataclass(frozen=True)
class PlanRun:
    """How a plan was made, beside what it is: not measurements of the plan, but what reproducing or
    auditing it needs."""

    versions: Mapping[str, str]  # mpq, torch, onnx, onnxruntime, ... (the analysis's and the export's)
    timings: Mapping[str, float]  # seconds per phase: sensitivity, activation_terms, search, measure, total
    evaluations: int  # configurations the search exported and evaluated to choose the plan
    search: Mapping[str, Any]  # the solver's details: solver, optimality, size retries, how the plan was chosen
    normalization: Mapping[str, Any] = field(default_factory=dict)  # NormalizedModel.to_dict(): what it changed

    def to_dict(self) -> dict[str, Any]:
        return {
            "versions": dict(self.versions),
            "timings": dict(self.timings),
            "evaluations": self.evaluations,
            "search": dict(self.search),
            "normalization": dict(self.normalization),
        }

    @classmethod
    def from_dict(cls, data: Any) -> PlanRun:
        fields = json_object(data, "a plan's run", _RUN_KEYS)
        return cls(
            versions=text_mapping("run.versions", fields["versions"]),
            timings=real_mapping("run.timings", fields["timings"]),
            evaluations=integer("run.evaluations", fields["evaluations"]),
            search=mapping("run.search", fields["search"]),
            normalization=mapping("run.normalization", fields["normalization"]),
        )


@dataclass(frozen=True)
class PlanResult:
    """What ``plan`` returns (plain picklable data). ``to_dict`` gives JSON data, the artifact by size and
    sha256; ``from_dict`` takes the artifact's bytes beside it."""

    request: PlanRequest
    plan: PlanPoint  # the chosen configuration, always measured
    meets_constraints: bool
    frontier: tuple[PlanPoint, ...]
    uniform: Mapping[str, PlanPoint]  # candidate -> every layer at it
    artifact_bytes: bytes = field(repr=False)
    artifact_sha256: str
    sensitivity: Mapping[str, Any] = field(repr=False)  # SensitivityResult.to_dict()
    run: PlanRun
    activation_terms: Mapping[str, ActivationTerm] = field(default_factory=dict)
    # Layers the search could not quantize freely (the request's exclude patterns, structural constants).
    excluded: tuple[Exclusion, ...] = ()
    # Layer name -> {"node_name", "scope"}: exporters name weights anonymously (onnx::MatMul_984).
    layer_nodes: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    # Baseline name -> the baseline model measured (every layer fp32; every layer fp16); fp16 is absent
    # where it could not be exported (a warning says why) and in results stored before baselines existed.
    baselines: Mapping[str, Measurement] = field(default_factory=dict)

    @property
    def configuration(self) -> Configuration:
        return Configuration(dict(self.plan.configuration))

    @property
    def slower_than_float(self) -> bool:
        """The chosen plan measured slower than the float model (ratio > 1 + its spread, same run)."""
        return self.plan.measured_slower_than_float

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_RESULT_FORMAT,
            "request": self.request.to_dict(),
            "plan": self.plan.to_dict(),
            "meets_constraints": self.meets_constraints,
            "slower_than_float": self.slower_than_float,
            "frontier": [point.to_dict() for point in self.frontier],
            "uniform": {name: point.to_dict() for name, point in self.uniform.items()},
            "artifact": {"sha256": self.artifact_sha256, "size_bytes": len(self.artifact_bytes)},
            "sensitivity": dict(self.sensitivity),
            "activation_terms": {layer: term.to_dict() for layer, term in self.activation_terms.items()},
            "excluded": [exclusion.to_dict() for exclusion in self.excluded],
            "layer_nodes": {layer: dict(node) for layer, node in self.layer_nodes.items()},
            "run": self.run.to_dict(),
            "baselines": {name: measurement.to_dict() for name, measurement in self.baselines.items()},
        }

    @classmethod
    def from_dict(cls, data: Any, artifact_bytes: bytes) -> PlanResult:
        """The result ``data`` (``to_dict()`` output) describes, with the artifact it names (its file's
        bytes: the JSON holds only their size and sha256, which ``artifact_bytes`` must match)."""
        fields = json_object(data, "a plan result", _RESULT_KEYS, PLAN_RESULT_FORMAT, _RESULT_OPTIONAL_KEYS)
        baselines = {} if fields["baselines"] is None else mapping("baselines", fields["baselines"])
        sha256 = _check_artifact(fields["artifact"], artifact_bytes)
        return cls(
            request=PlanRequest.from_dict(mapping("request", fields["request"])),
            plan=PlanPoint.from_dict(fields["plan"]),
            meets_constraints=flag("meets_constraints", fields["meets_constraints"]),
            frontier=tuple(PlanPoint.from_dict(point) for point in json_list("frontier", fields["frontier"])),
            uniform={name: PlanPoint.from_dict(point) for name, point in mapping("uniform", fields["uniform"]).items()},
            artifact_bytes=artifact_bytes,
            artifact_sha256=sha256,
            sensitivity=mapping("sensitivity", fields["sensitivity"]),
            run=PlanRun.from_dict(fields["run"]),
            activation_terms={
                layer: ActivationTerm.from_dict(layer, term)
                for layer, term in mapping("activation_terms", fields["activation_terms"]).items()
            },
            excluded=tuple(Exclusion.from_dict(exclusion) for exclusion in json_list("excluded", fields["excluded"])),
            layer_nodes={
                layer: text_mapping(f"layer_nodes[{layer!r}]", node)
                for layer, node in mapping("layer_nodes", fields["layer_nodes"]).items()
            },
            baselines={name: Measurement.from_dict(value) for name, value in _baselines(baselines)},
        )


def _check_artifact(data: Any, artifact_bytes: bytes) -> str:
    """The artifact's sha256, once ``artifact_bytes`` are the file the result names."""
    fields = json_object(data, "a plan's artifact", ("sha256", "size_bytes"))
    sha256 = text("artifact.sha256", fields["sha256"])
    size = integer("artifact.size_bytes", fields["size_bytes"])
    require(
        len(artifact_bytes) == size and hashlib.sha256(artifact_bytes).hexdigest() == sha256,
        f"the artifact given is not the plan's: {len(artifact_bytes)} bytes, sha256 "
        f"{hashlib.sha256(artifact_bytes).hexdigest()}; the plan names {size} bytes, sha256 {sha256}",
    )
    return sha256


def listed_frontier(frontier: Sequence[PlanPoint]) -> tuple[PlanPoint, ...]:
    """The frontier thinned to ``MAX_LISTED_FRONTIER`` points, keeping every measured one."""
    if len(frontier) <= MAX_LISTED_FRONTIER:
        return tuple(frontier)
    measured = [k for k, p in enumerate(frontier) if p.measured is not None]
    spread = np.linspace(0, len(frontier) - 1, max(MAX_LISTED_FRONTIER - len(measured), 2)).round().astype(int)
    return tuple(frontier[k] for k in sorted(set(spread.tolist()) | set(measured)))

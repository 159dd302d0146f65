"""The plan's data: ``Measurement``, ``PlanPoint``, ``PlanRun`` and ``PlanResult`` (the last step of ``planner.plan``).

Each converts to plain JSON data with ``to_dict()`` and back with ``from_dict()`` (never pickle).
``Measurement``, ``PlanPoint`` and ``PlanResult`` documents carry their format, as the objective's
does (``planner.objective.FORMAT``); the objects nested in them are read as part of it. ``from_dict``
refuses another format, an unknown or missing key and a value of the wrong type with a ValueError
that names it (``planner.checks``), so a document written by another version is never misread.
"""

from __future__ import annotations

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
from planner.latency import LatencyMeasurement
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
        }

    @classmethod
    def from_dict(cls, data: Any) -> Measurement:
        fields = json_object(data, "a measurement", _MEASUREMENT_KEYS, MEASUREMENT_FORMAT)
        latency = fields["latency_ms"]
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
        )


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

    @property
    def configuration(self) -> Configuration:
        return Configuration(dict(self.plan.configuration))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_RESULT_FORMAT,
            "request": self.request.to_dict(),
            "plan": self.plan.to_dict(),
            "meets_constraints": self.meets_constraints,
            "frontier": [point.to_dict() for point in self.frontier],
            "uniform": {name: point.to_dict() for name, point in self.uniform.items()},
            "artifact": {"sha256": self.artifact_sha256, "size_bytes": len(self.artifact_bytes)},
            "sensitivity": dict(self.sensitivity),
            "activation_terms": {layer: term.to_dict() for layer, term in self.activation_terms.items()},
            "excluded": [exclusion.to_dict() for exclusion in self.excluded],
            "layer_nodes": {layer: dict(node) for layer, node in self.layer_nodes.items()},
            "run": self.run.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Any, artifact_bytes: bytes) -> PlanResult:
        """The result ``data`` (``to_dict()`` output) describes, with the artifact it names (its file's
        bytes: the JSON holds only their size and sha256, which ``artifact_bytes`` must match)."""
        fields = json_object(data, "a plan result", _RESULT_KEYS, PLAN_RESULT_FORMAT)
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

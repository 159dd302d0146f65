"""The plan's data: ``Measurement``, ``PlanPoint`` and ``PlanResult`` (the last step of ``planner.plan``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from planner.activation import ActivationTerm
from planner.candidates import Configuration
from planner.exclude import Exclusion
from planner.latency import LatencyMeasurement
from planner.request import PlanRequest

# The frontier listed in a result is thinned to this many points (always keeping the measured
# ones): a DP frontier of a large model can have many thousands of points.
MAX_LISTED_FRONTIER = 256


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


def listed_frontier(frontier: Sequence[PlanPoint]) -> tuple[PlanPoint, ...]:
    """The frontier thinned to ``MAX_LISTED_FRONTIER`` points, keeping every measured one."""
    if len(frontier) <= MAX_LISTED_FRONTIER:
        return tuple(frontier)
    measured = [k for k, p in enumerate(frontier) if p.measured is not None]
    spread = np.linspace(0, len(frontier) - 1, max(MAX_LISTED_FRONTIER - len(measured), 2)).round().astype(int)
    return tuple(frontier[k] for k in sorted(set(spread.tolist()) | set(measured)))

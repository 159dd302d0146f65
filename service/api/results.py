"""The documents jobs store, typed for the API's schema: sensitivity results, plan results and their
parts, and what a job's ``result`` holds.

Their shapes are the libraries' ``to_dict()`` (the API process does not import the libraries):
``sensitivity.results.SensitivityResult`` and ``planner.result.PlanResult`` with its ``PlanPoint`` and
``Measurement``. They are TypedDicts, checked when a response is made and served as stored: a key that
an older document lacks stays absent (``NotRequired``, never filled in with null or a default), and a
key that a newer one adds is kept (``extra="allow"``). tests/service/test_openapi.py checks real job
outputs against the published schema, with no key left undeclared.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, NotRequired

from pydantic import ConfigDict, Field, with_config
from typing_extensions import TypedDict  # pydantic needs this one on Python < 3.12

STORED = ConfigDict(extra="allow")


# ---------------------------------------------------------------- sensitivity


@with_config(STORED)
class AnalysisConfig(TypedDict):
    """The analysis's settings (``sensitivity.results.TraceConfig``, ``EigenConfig``, ``InterLayerConfig``,
    ``FisherConfig`` or ``MeasuredConfig``, by ``type``); docs/sensitivity.md describes each."""

    type: Literal["TraceConfig", "EigenConfig", "InterLayerConfig", "FisherConfig", "MeasuredConfig"]
    seed: int
    batch_size: int
    device: str
    task: str
    hvp_method: str
    probes_per_pass: int
    memory_budget_mb: NotRequired[int | None]
    time_budget_s: NotRequired[float | None]
    tolerance: NotRequired[float]  # TraceConfig, EigenConfig
    min_probes: NotRequired[int]  # TraceConfig
    max_probes: NotRequired[int]  # TraceConfig
    max_iterations: NotRequired[int]  # EigenConfig
    bits: NotRequired[list[int]]  # InterLayerConfig, FisherConfig
    candidates: NotRequired[list[str]]  # MeasuredConfig
    quantity: NotRequired[Literal["auto", "loss", "kl"]]  # MeasuredConfig (sensitivity.results.MEASURED_QUANTITIES)
    trace_tolerance: NotRequired[float]
    trace_min_probes: NotRequired[int]
    trace_max_probes: NotRequired[int]


@with_config(STORED)
class LayerInfo(TypedDict):
    """A layer, named by its weight initializer, with its node's name and module path where known."""

    name: str
    op_type: str
    shape: list[int]
    num_params: int
    channel_axis: int
    node_name: NotRequired[str]
    scope: NotRequired[str]


@with_config(STORED)
class LayerTrace(TypedDict):
    """Hutchinson estimate of Tr(Hᵢᵢ) over ``num_probes`` Rademacher probes, with its standard error."""

    name: str
    num_params: int
    trace: float
    standard_error: float
    num_probes: int
    average_trace: Annotated[float, Field(description="Tr(Hᵢᵢ)/nᵢ")]


@with_config(STORED)
class LayerEigen(TypedDict):
    """Power-iteration estimate of the largest-magnitude eigenvalue of Hᵢᵢ (HAWQ-V1)."""

    name: str
    eigenvalue: float
    iterations: int
    converged: bool
    relative_change: float | None


@with_config(STORED)
class InterLayerTerms(TypedDict):
    """g·Δ, G and Ω by (layer, weight bits): ``matrix[a][c]`` = G[labels[a], labels[c]] (docs/design.md)."""

    labels: Annotated[list[tuple[str, int]], Field(description="[layer, weight bits] of each row and column")]
    matrix: list[list[float]]
    gradient_terms: list[float]
    delta_norms_squared: list[float]
    omega: list[float]
    symmetry_error: Annotated[float, Field(description="max|G − Gᵀ| / max|G|")]
    gradient_term_errors: NotRequired[list[float]]


@with_config(STORED)
class FisherTerms(TypedDict):
    """The empirical Fisher's predicted loss change ½ Σ Fᵢᵢ Δᵢ² by (layer, weight bits), with its standard error
    over the calibration samples, and each layer's Fisher trace Σ Fᵢᵢ (docs/sensitivity.md)."""

    labels: Annotated[list[tuple[str, int]], Field(description="[layer, weight bits] of each entry")]
    loss_changes: Annotated[list[float], Field(description="½ Σ Fᵢᵢ Δᵢ², the mean over samples of ½ Σ gₙ,ᵢ² Δᵢ²")]
    standard_errors: Annotated[list[float], Field(description="sample SD of the per-sample terms over √N")]
    layer_names: list[str]
    fisher_traces: Annotated[list[float], Field(description="Σ Fᵢᵢ over each layer of layer_names")]
    num_samples: int


@with_config(STORED)
class MeasuredTerms(TypedDict):
    """Each layer quantized alone to each candidate in the exported onnxruntime model: the mean per-sample
    calibration loss change against the float model, with its standard error (docs/sensitivity.md)."""

    labels: Annotated[list[tuple[str, str]], Field(description="[layer, candidate] of each entry")]
    loss_changes: Annotated[list[float], Field(description="mean over samples of ℓₙ(quantized) − ℓₙ(float)")]
    standard_errors: Annotated[list[float], Field(description="sample SD of the per-sample changes over √N")]
    num_samples: int
    quantity: NotRequired[Literal["loss", "kl"]]


@with_config(STORED)
class SensitivityResult(TypedDict):
    """``sensitivity.results.SensitivityResult.to_dict()``: the fields an analysis does not compute are null."""

    config: AnalysisConfig
    layers: list[LayerInfo]
    loss_kind: str
    loss_reason: NotRequired[str]
    loss: Annotated[float, Field(description="L(W₀), the calibration loss of the float model")]
    num_samples: int
    traces: list[LayerTrace] | None
    eigenvalues: list[LayerEigen] | None
    interlayer: InterLayerTerms | None
    fisher: NotRequired[FisherTerms | None]
    measured: NotRequired[MeasuredTerms | None]
    timings: Annotated[dict[str, float], Field(description="seconds per phase")]
    num_hvps: int
    seed: int
    versions: dict[str, str]
    device: str
    normalization: NotRequired[
        Annotated[
            dict[str, Any], Field(description="what normalising the ONNX model (for a .pt2: its ONNX export) changed")
        ]
    ]
    execution: NotRequired[
        Annotated[
            dict[str, Any],
            Field(description="how the run spent memory and time: batch size, probes per pass, HVP method, peak RSS"),
        ]
    ]


# ---------------------------------------------------------------- plans


@with_config(STORED)
class LatencyFigures(TypedDict):
    """A latency measurement of the exported model, in milliseconds."""

    mean: float
    p50: float
    p90: float
    batch_size: int
    repeats: int
    device: str
    provider: str
    onnxruntime_version: NotRequired[str]


@with_config(STORED)
class Comparison(TypedDict):
    """A measured configuration against a baseline model (``planner.result.Comparison``)."""

    metric: Annotated[float, Field(description="the baseline model's metric, percent")]
    drop: Annotated[float, Field(description="the baseline's metric minus this configuration's, percentage points")]
    latency_ratio: Annotated[
        float | None, Field(description="p50 latency / the baseline's p50 (below 1: faster); null if unmeasured")
    ]
    size_ratio: Annotated[float, Field(description="artifact bytes / the baseline's artifact bytes")]


@with_config(
    ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {
                    "format": "mpq.measurement/1",
                    "metric_name": "top1_accuracy",
                    "metric_reason": "labels given: top-1 accuracy against them",
                    "output_kind": "class_scores",
                    "metric": 97.8,
                    "baseline": 98.1,
                    "drop": 0.3,
                    "num_samples": 360,
                    "size_bytes": 48213,
                    "sha256": "9f2c" + "0" * 60,
                    "latency_ms": {
                        "mean": 0.21,
                        "p50": 0.2,
                        "p90": 0.24,
                        "batch_size": 1,
                        "repeats": 50,
                        "device": "Intel(R) Xeon(R) Platinum 8480+, 16 cores",
                        "provider": "CPUExecutionProvider",
                        "onnxruntime_version": "1.23.0",
                    },
                    "latency_ratio_to_float": 0.81,
                    "latency_ratio_spread": 0.02,
                    "float_latency_p50_ms": 0.25,
                }
            ]
        },
    )
)
class Measurement(TypedDict):
    """What the exported configuration measured in onnxruntime (``planner.result.Measurement``):
    metric, baseline and drop in percent (points), on ``num_samples`` evaluation samples."""

    format: NotRequired[str]
    metric_name: str
    metric_reason: NotRequired[str]
    output_kind: NotRequired[str]
    metric: float
    baseline: float
    drop: float
    num_samples: int
    size_bytes: Annotated[int, Field(description="the artifact's bytes")]
    sha256: str
    latency_ms: LatencyFigures | None
    latency_ratio_to_float: NotRequired[
        Annotated[
            float | None,
            Field(
                description="median over rounds of this model's time / the float model's, timed interleaved in "
                "one run; < 1 is faster. Decisions use it, not ms from separate runs (absent in older plans)"
            ),
        ]
    ]
    latency_ratio_spread: NotRequired[
        Annotated[float | None, Field(description="half-width of the ratio's 90 % interval (order statistics)")]
    ]
    float_latency_p50_ms: NotRequired[
        Annotated[float | None, Field(description="the float model's median latency in the same run")]
    ]
    against: NotRequired[
        Annotated[
            dict[str, Comparison],
            Field(description="baseline (fp32: the float model; fp16: every layer at fp16) -> this against it"),
        ]
    ]


@with_config(ConfigDict(extra="forbid"))
class NotMeasured(TypedDict):
    """An empty object: the point was not measured."""


@with_config(STORED)
class PredictedFigures(TypedDict):
    """A configuration's computed costs and predicted loss changes."""

    omega: Annotated[float, Field(description="Ω(c), HAWQ-V2's diagonal proxy")]
    loss_change: Annotated[float, Field(description="ΔL(c) = Σ g·Δ + ½ ΣΣ G")]
    size_bytes: int
    bops: int
    latency_ms: NotRequired[
        Annotated[float, Field(description="predicted by the latency table, where the search's cost was latency")]
    ]


@with_config(STORED)
class PlanPredictedFigures(PredictedFigures):
    meets_constraints: bool


Configuration = Annotated[
    dict[str, str], Field(description="layer name -> candidate (fp32, fp16, w8a8, w4a8, w8a16, w8, w4)")
]


@with_config(STORED)
class PlanPoint(TypedDict):
    """A configuration with its predicted figures and, where it was exported and evaluated, its measurement."""

    format: NotRequired[str]
    layers: Configuration
    predicted: PredictedFigures
    measured: Measurement | None


@with_config(STORED)
class Exclusion(TypedDict):
    """A layer kept out of the search, with why and the candidates it was left."""

    layer: str
    node_name: str
    scope: str
    reason: str
    candidates: list[str]


@with_config(STORED)
class ActivationTerm(TypedDict):
    """A layer's measured activation-quantization term, added to l and Ω of the candidates that quantize
    activations (``planner.activation``)."""

    tensors: list[str]
    loss_change: float
    standard_error: float


@with_config(STORED)
class LayerNode(TypedDict):
    node_name: str
    scope: str


@with_config(STORED)
class ArtifactFigures(TypedDict):
    sha256: str
    size_bytes: int


@with_config(STORED)
class PlanRun(TypedDict):
    """How the plan was made: versions, seconds per phase, configurations evaluated, the solver's details."""

    versions: NotRequired[dict[str, str]]
    timings: NotRequired[dict[str, float]]
    evaluations: NotRequired[int]
    search: NotRequired[dict[str, Any]]
    normalization: NotRequired[dict[str, Any]]


@with_config(STORED)
class PlanResult(TypedDict):
    """``planner.result.PlanResult.to_dict()`` less the sensitivity (its own resource,
    ``GET /v1/sensitivity/{id}``); plans stored before a part existed lack it."""

    format: NotRequired[str]
    request: NotRequired[Annotated[dict[str, Any], Field(description="the library's plan request")]]
    plan: NotRequired[PlanPoint]
    meets_constraints: NotRequired[bool]
    slower_than_float: NotRequired[
        Annotated[bool, Field(description="the plan measured slower than the float model: ratio > 1 + its spread")]
    ]
    frontier: NotRequired[
        Annotated[list[PlanPoint], Field(description="thinned to 256 points, every measured one kept")]
    ]
    uniform: NotRequired[Annotated[dict[str, PlanPoint], Field(description="candidate -> every layer at it")]]
    artifact: NotRequired[ArtifactFigures]
    activation_terms: NotRequired[dict[str, ActivationTerm]]
    excluded: NotRequired[list[Exclusion]]
    layer_nodes: NotRequired[dict[str, LayerNode]]
    run: NotRequired[PlanRun]
    baselines: NotRequired[
        Annotated[dict[str, Measurement], Field(description="the baseline models measured: fp32 and fp16")]
    ]


# ---------------------------------------------------------------- jobs


@with_config(STORED)
class JobResult(TypedDict):
    """What a finished job left: the ids of the rows it stored by job type, or the code of its failure."""

    sensitivity_result_id: NotRequired[Annotated[str | None, Field(description="sensitivity and plan jobs")]]
    cached: NotRequired[Annotated[bool, Field(description="sensitivity jobs: a stored result was reused")]]
    plan_id: NotRequired[Annotated[str, Field(description="plan jobs")]]
    meets_constraints: NotRequired[Annotated[bool, Field(description="plan jobs")]]
    latency_measurement_id: NotRequired[Annotated[str, Field(description="latency jobs")]]
    error_code: NotRequired[
        Annotated[
            str,
            Field(description="failed jobs: bad_input, infeasible, resource_limit, time_limit or internal"),
        ]
    ]

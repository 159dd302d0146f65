"""Plans over HTTP: submit, read, frontier, artifact download, latency measurements."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Annotated, Any, Literal, cast, get_args

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from typing_extensions import TypedDict

from service.api.errors import Problem
from service.api.jobs import (
    DATASET_ID,
    DEFAULT_METHOD,
    JOB_SUBMISSION_RESPONSES,
    MODEL_ID,
    IdempotencyKey,
    JobOut,
    SampleAxes,
    check_request,
    load_inputs,
    submit_job,
)
from service.api.results import (
    Configuration,
    Measurement,
    NotMeasured,
    PlanPredictedFigures,
    PlanResult,
    PredictedFigures,
)
from service.api.transfer import DOWNLOAD_RESPONSES, blob_response
from service.store.sql_store import SqlStore
from service.store.tables import Artifact, Model, Plan

router = APIRouter(tags=["plans"])
NO_PLAN = {"description": "No plan with this id"}
EVALUATION_DATASET_ID = "c3b2a1f0e9d84c7b6a5f4e3d2c1b0a9f"  # in the examples
# planner.DEFAULT_CANDIDATES, written out as the bounds below are (the API process does not import
# the planner, which pulls in torch); tests/planner/test_public_api.py pins it equal.
DEFAULT_CANDIDATES = ["fp32", "w8a8", "w4a8", "w8", "w4"]


# The library's bounds (planner.plan; the API process does not import the libraries, which pull in
# torch): tests/service/test_plans.py checks that these agree. strict: ints must be JSON ints (not
# true, 1.5 or "8"), as the library requires; allow_inf_nan=False: Python's json reads Infinity and NaN.
MAX_COST = 2**63 - 1
MAX_LATENCY_MS = 3_600_000
MAX_LATENCY_REPEATS = 10_000
MAX_LATENCY_WARMUP = 1_000
MAX_LATENCY_BATCH_SIZE = 4_096
Metric = Literal["auto", "top1", "cosine", "neighbour_agreement", "step_agreement"]  # planner.evaluate.METRICS
METRICS: tuple[str, ...] = get_args(Metric)
Baseline = Literal["fp32", "fp16"]  # planner.request.BASELINES
BASELINES: tuple[str, ...] = get_args(Baseline)
MAX_EXCLUDE_PATTERNS = 256  # planner.exclude's
MAX_EXCLUDE_PATTERN_LENGTH = 1024
ExcludePattern = Annotated[str, Field(min_length=1, max_length=MAX_EXCLUDE_PATTERN_LENGTH)]


class Constraints(BaseModel):
    max_size_bytes: int | None = Field(None, gt=0, le=MAX_COST, strict=True)
    max_bops: int | None = Field(None, gt=0, le=MAX_COST, strict=True)
    max_latency_ms: float | None = Field(None, gt=0, le=MAX_LATENCY_MS, strict=True, allow_inf_nan=False)
    max_drop: float | None = Field(
        None, ge=0, le=100, strict=True, allow_inf_nan=False, description="percentage points of the metric"
    )


class PlanRequestIn(BaseModel):
    """The body's shape and the bounds of its fields, for the schema and a 422 before anything is read.
    The rules between fields (one budget at most, bisection needs max_drop, ...) are the library's own:
    ``planner.PlanRequest`` checks the body at submission, in the inspector process
    (``service.inspection.checks.check_job_request``), so the API and the CLI refuse the same requests
    with the same words."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model_id": MODEL_ID,
                    "calibration_dataset_id": DATASET_ID,
                    "evaluation_dataset_id": EVALUATION_DATASET_ID,
                    "method": "hawq_v2",
                    "search": "pareto",
                    "candidates": ["fp32", "w8a8", "w4a8"],
                    "constraints": {"max_size_bytes": 4_000_000, "max_drop": 1.0},
                    "exclude": ["classifier.*"],
                    "options": {"trace_max_probes": 64},
                }
            ]
        }
    )
    model_id: str = Field(max_length=64)
    calibration_dataset_id: str = Field(max_length=64)
    evaluation_dataset_id: str | None = Field(None, max_length=64)
    method: Literal["hawq_v2", "interlayer", "fisher", "measured"] = DEFAULT_METHOD
    search: Literal["pareto", "bisection"] = "pareto"
    candidates: list[str] = Field(default_factory=lambda: list(DEFAULT_CANDIDATES), min_length=1, max_length=16)
    constraints: Constraints = Field(default_factory=Constraints)
    objective: Literal["loss", "latency"] = Field(
        "loss",
        description="loss: the least predicted loss within the constraints; latency: the fastest configuration "
        "measured against the float model within them, never one slower than float (planner.latency_table)",
    )
    metric: Metric = Field(
        "auto",
        description="what max_drop is measured on; auto picks it from the model's output kind (planner.evaluate)",
    )
    baseline: Baseline = Field(
        "fp32",
        description="what max_drop is measured against: the float model (fp32) or every layer at fp16; "
        "every measured point states its drop and latency against both (measured.against)",
    )
    exclude: list[ExcludePattern] = Field(
        default_factory=list,
        max_length=MAX_EXCLUDE_PATTERNS,
        description="layers kept fp32: layer (weight initializer) names, node "
        "names or glob patterns (*, ?) matched against both; a "
        "pattern matching no layer is refused (422)",
    )
    options: dict[str, Any] = Field(
        default_factory=dict, max_length=32, description="sensitivity options (seed, tolerance, max_probes, batch_size)"
    )
    sample_axes: SampleAxes


class FrontierPointOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    index: int
    assignment: Configuration
    size_bytes: int | None
    bops: float | None
    predicted_loss_change: float | None = Field(
        description="Ω for hawq_v2, fisher and measured plans, ΔL for interlayer ones"
    )
    predicted: PredictedFigures
    measured: Measurement | NotMeasured


class ArtifactLink(TypedDict):
    """The plan's quantized ONNX: its sha256 (the download's ETag), size, file name and download URL."""

    sha256: str
    size_bytes: int
    filename: str
    url: str


class PlanOut(BaseModel):
    id: str
    job_id: str | None
    model_id: str
    calibration_dataset_id: str
    evaluation_dataset_id: str | None
    search: str
    request: dict[str, Any] = Field(description="the request as submitted, with the sensitivity result it used")
    assignment: Configuration
    predicted: PlanPredictedFigures
    measured: Measurement | NotMeasured = Field(description="the chosen configuration's measurements")
    artifact: ArtifactLink | None
    versions: dict[str, Any]
    result: PlanResult = Field(
        description="the planner's result document (planner.PlanResult.to_dict(), less the sensitivity, "
        "which is its own resource): frontier, uniform points, exclusions, layer nodes and the run's "
        "metadata under `run`; plans stored before it hold only the parts they had"
    )
    created_at: datetime


class PlanPage(BaseModel):
    items: list[PlanOut]
    total: int


class LatencyOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: str
    mean_ms: float
    p50_ms: float
    p90_ms: float
    batch_size: int
    repeats: int
    device_description: str
    provider: str
    onnxruntime_version: str
    created_at: datetime


class LatencyRequest(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"batch_size": 8, "repeats": 100, "warmup": 10, "device": "cuda"}]}
    )
    batch_size: int = Field(1, ge=1, le=MAX_LATENCY_BATCH_SIZE, strict=True)
    repeats: int = Field(50, ge=1, le=MAX_LATENCY_REPEATS, strict=True)
    warmup: int = Field(10, ge=0, le=MAX_LATENCY_WARMUP, strict=True)
    device: Literal["auto", "cpu", "cuda"] = "auto"


def plan_out(plan: Plan, artifact: Artifact | None) -> PlanOut:
    return PlanOut(
        id=plan.id,
        job_id=plan.job_id,
        model_id=plan.model_id,
        calibration_dataset_id=plan.calibration_dataset_id,
        evaluation_dataset_id=plan.evaluation_dataset_id,
        search=plan.search,
        request=plan.request,
        # the stored documents, checked by pydantic here (service/api/results.py)
        assignment=plan.assignment,
        predicted=cast(PlanPredictedFigures, plan.predicted),
        measured=cast(Measurement, plan.measured),
        result=cast(PlanResult, plan.result),
        artifact=None
        if artifact is None
        else {
            "sha256": artifact.sha256,
            "size_bytes": artifact.size_bytes,
            "filename": artifact.filename,
            "url": f"/v1/plans/{plan.id}/artifact",
        },
        versions=plan.versions,
        created_at=plan.created_at,
    )


def _plan_or_404(db: SqlStore, plan_id: str) -> tuple[Plan, Artifact | None]:
    plan, artifact = db.plan_with_artifact(plan_id)
    if plan is None:
        raise Problem(404, f"no plan with id {plan_id!r}")
    return plan, artifact


@router.post(
    "/plans",
    status_code=202,
    response_model=JobOut,
    summary="Plan per-layer precisions: sensitivity, search, export, measurement (a job)",
    responses=JOB_SUBMISSION_RESPONSES,
)
async def create_plan(request: Request, body: PlanRequestIn, idempotency_key: IdempotencyKey = None) -> JSONResponse:
    model, (calibration, evaluation) = load_inputs(
        request, body.model_id, [body.calibration_dataset_id, body.evaluation_dataset_id]
    )
    # every plan computes the inter-layer analysis (traces, g·Δ, G, Ω), whatever objective it optimises
    await check_request(
        request,
        model,
        "interlayer",
        body.options,
        {"calibration": calibration, "evaluation": evaluation},
        plan=body.model_dump(),
    )
    return submit_job(request, "plan", body.model_dump(), idempotency_key)


@router.get("/plans", response_model=PlanPage, summary="List plans, newest first")
def list_plans(
    request: Request,
    model_id: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=10**6)] = 0,
) -> PlanPage:
    rows, total = request.app.state.db.list_plans(model_id=model_id, limit=limit, offset=offset)
    return PlanPage(items=[plan_out(plan, artifact) for plan, artifact in rows], total=total)


class ResponseCache:
    """Serialized bodies of immutable resources (a plan never changes once written), bounded in
    entries and time: the TTL bounds staleness when another API process deletes a plan.

    Misses are single-flight: when an entry expires under load, every waiting request shares one
    computation. Without that, all concurrent clients missed together every TTL and queued on the
    thread pool and the database pool, which made the p99 of GET /v1/plans/{id} ~0.8 s.
    """

    def __init__(self, max_entries: int = 1024, ttl_s: float = 10.0) -> None:
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._entries: dict[str, tuple[float, bytes]] = {}
        self._pending: dict[str, asyncio.Future[bytes]] = {}

    def get(self, key: str) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    def put(self, key: str, body: bytes) -> None:
        if len(self._entries) >= self.max_entries:
            self._entries.pop(next(iter(self._entries)))
        self._entries[key] = (time.monotonic() + self.ttl_s, body)

    def clear(self) -> None:
        self._entries.clear()

    async def get_or_compute(self, key: str, compute: Callable[[], Awaitable[bytes]]) -> bytes:
        body = self.get(key)
        if body is not None:
            return body
        pending = self._pending.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._compute(key, compute))
            pending.add_done_callback(_retrieve_exception)
            self._pending[key] = pending
        # shield: one client hanging up must not cancel the computation the others wait for
        return await asyncio.shield(pending)

    async def _compute(self, key: str, compute: Callable[[], Awaitable[bytes]]) -> bytes:
        try:
            body = await compute()
            self.put(key, body)
            return body
        finally:
            del self._pending[key]


def _retrieve_exception(future: asyncio.Future[bytes]) -> None:
    """Marks a failure as seen even when every waiter has gone (no 'never retrieved' warning)."""
    if not future.cancelled():
        future.exception()


@router.get(
    "/plans/{plan_id}",
    response_model=PlanOut,
    summary="Per-layer assignment with predicted and measured quality, size, BOPS and latency",
    responses={404: NO_PLAN},
)
async def get_plan(request: Request, plan_id: str) -> Response:
    cache: ResponseCache = request.app.state.plan_cache
    body = await cache.get_or_compute(plan_id, lambda: run_in_threadpool(_plan_json, request, plan_id))
    return Response(body, media_type="application/json")


def _plan_json(request: Request, plan_id: str) -> bytes:
    return plan_out(*_plan_or_404(request.app.state.db, plan_id)).model_dump_json().encode()


@router.get(
    "/plans/{plan_id}/frontier",
    response_model=list[FrontierPointOut],
    summary="The plan's frontier points, predicted and (where measured) measured",
    responses={404: NO_PLAN},
)
def get_frontier(request: Request, plan_id: str) -> list[FrontierPointOut]:
    db: SqlStore = request.app.state.db
    _plan_or_404(db, plan_id)
    return [FrontierPointOut.model_validate(point) for point in db.frontier(plan_id)]


@router.head("/plans/{plan_id}/artifact", include_in_schema=False)  # headers only: service/api/transfer.blob_response
@router.get(
    "/plans/{plan_id}/artifact",
    summary="Download the quantized ONNX model",
    responses=DOWNLOAD_RESPONSES,
)
def get_artifact(request: Request, plan_id: str) -> Response:
    _plan, artifact = _plan_or_404(request.app.state.db, plan_id)
    if artifact is None:
        raise Problem(404, f"plan {plan_id!r} has no artifact")
    return blob_response(request, request.app.state.store, artifact.sha256, artifact.filename, artifact.media_type)


@router.post(
    "/plans/{plan_id}/latency",
    status_code=202,
    response_model=JobOut,
    summary="Measure the plan's artifact again on a worker (e.g. another device)",
    responses={**JOB_SUBMISSION_RESPONSES, 404: NO_PLAN, 409: {"description": "The plan has no artifact yet"}},
)
def remeasure_latency(
    request: Request, plan_id: str, body: LatencyRequest | None = None, idempotency_key: IdempotencyKey = None
) -> JSONResponse:
    plan, _artifact = _plan_or_404(request.app.state.db, plan_id)
    if plan.artifact_id is None:
        raise Problem(409, f"plan {plan_id!r} has no artifact to measure yet")
    return submit_job(
        request, "latency", {"plan_id": plan_id, **(body or LatencyRequest()).model_dump()}, idempotency_key
    )


@router.get(
    "/plans/{plan_id}/latency",
    response_model=list[LatencyOut],
    summary="Every latency measurement of the plan's artifact, with its device",
    responses={404: NO_PLAN},
)
def list_latency(request: Request, plan_id: str) -> list[LatencyOut]:
    db: SqlStore = request.app.state.db
    _plan_or_404(db, plan_id)
    return [LatencyOut.model_validate(row) for row in db.latency_measurements(plan_id)]


class LatencyTableOut(BaseModel):
    """A measured latency table (``planner.latency_table.LatencyTable.to_dict()`` in ``table``): each
    layer's contribution per candidate in ms and as a fraction of the float model's time, with its
    spread, and each adjacent pair's interaction term (``pairs``); stored by the plan job that
    measured it and reused by later plans of the model on the same
    device, provider, onnxruntime version, batch size and candidates."""

    model_config = ConfigDict(from_attributes=True)
    id: str
    created_at: datetime
    job_id: str | None
    device_description: str
    provider: str
    onnxruntime_version: str
    batch_size: int
    candidates: str
    table: dict[str, Any]


@router.get(
    "/models/{model_id}/latency-tables",
    response_model=list[LatencyTableOut],
    summary="The model's measured latency tables, newest first",
    responses={404: {"description": "No model with this id"}},
)
def list_latency_tables(request: Request, model_id: str) -> list[LatencyTableOut]:
    db: SqlStore = request.app.state.db
    model = db.get(Model, model_id)
    if model is None:
        raise Problem(404, f"no model with id {model_id!r}")
    return [LatencyTableOut.model_validate(row) for row in db.latency_tables(model.sha256)]

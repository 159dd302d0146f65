"""Jobs and sensitivity analyses over HTTP."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from typing import Annotated, Any, Final, Literal, cast

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from service.api.auth import request_owner
from service.api.errors import Problem
from service.api.results import JobResult, SensitivityResult
from service.inspection.checks import InvalidUpload
from service.job_status import JobStatus
from service.store.sql_store import SqlStore
from service.store.tables import Dataset, Job, Model, SensitivityResultRow

router = APIRouter(tags=["jobs"])

IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=200)]
MODEL_ID = "5b0e3c1f9a7d4e2b8c6a1f0e9d8c7b6a"  # ids in the schema's examples
DATASET_ID = "a1d4c7e0b3f6492d8e5a7c9b1f0e2d3c"
JOB_ID = "0c9e8d7f6a5b4c3d2e1f0a9b8c7d6e5f"
# planner.DEFAULT_METHOD, written out (the API process does not import the planner);
# tests/planner/test_public_api.py pins it equal.
DEFAULT_METHOD: Final = "measured"


class Progress(BaseModel):
    phase: str | None
    fraction: float
    message: str | None


class JobOut(BaseModel):
    # A failed job: its example shows every field (FastAPI's schema drops example values that are null).
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": JOB_ID,
                    "type": "plan",
                    "status": "failed",
                    "params": {"model_id": MODEL_ID, "calibration_dataset_id": DATASET_ID, "search": "bisection"},
                    "progress": {"phase": "plan:search", "fraction": 0.6, "message": "bisection step 3 of 5"},
                    "result": {"error_code": "time_limit"},
                    "error": "time limit: the job ran longer than 21600 s (MPQ_JOB_TIME_LIMIT_S)",
                    "log_tail": "[plan:search] 60% bisection step 3 of 5",
                    "worker_id": "node-1:4242",
                    "attempts": 1,
                    "cancel_requested": False,
                    "created_at": "2026-12-01T03:30:00Z",
                    "started_at": "2026-12-01T03:30:01Z",
                    "finished_at": "2026-12-01T09:30:01Z",
                    "heartbeat_at": "2026-12-01T09:29:59Z",
                }
            ]
        }
    )
    id: str
    type: str
    status: JobStatus
    params: dict[str, Any]
    progress: Progress
    result: JobResult
    error: str | None
    log_tail: str | None
    worker_id: str | None
    attempts: int
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None

    @classmethod
    def of(cls, job: Job) -> JobOut:
        return cls(
            id=job.id,
            type=job.type,
            status=job.status,
            params=job.params,
            progress=Progress(phase=job.progress_phase, fraction=job.progress_fraction, message=job.progress_message),
            result=cast(JobResult, job.result or {}),  # checked by pydantic here
            error=job.error,
            log_tail=job.log_tail,
            worker_id=job.worker_id,
            attempts=job.attempts,
            cancel_requested=job.cancel_requested,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            heartbeat_at=job.heartbeat_at,
        )


class JobPage(BaseModel):
    items: list[JobOut]
    total: int


# sensitivity.samples' bounds (the API process does not import the libraries): tests/service/test_plans.py
# checks that these agree. strict: an axis is a JSON int (not true, 1.0 or "1").
MAX_SAMPLE_AXES = 256
MAX_INPUT_NAME_LENGTH = 1024
MAX_SAMPLE_AXIS = 255
InputName = Annotated[str, Field(min_length=1, max_length=MAX_INPUT_NAME_LENGTH)]
SampleAxis = Annotated[int, Field(ge=0, le=MAX_SAMPLE_AXIS, strict=True)]
SampleAxes = Annotated[
    dict[InputName, SampleAxis | None],
    Field(
        default_factory=dict,
        max_length=MAX_SAMPLE_AXES,
        description="model input name -> the axis its samples lie on, or null for an input shared by every sample "
        "(one value, e.g. a sample rate); merged over what the ONNX model's declared input shapes say "
        '(docs/sensitivity.md, "Sample axes"). An unknown input or an axis beyond the input\'s rank is '
        "refused (422); torch.export archives take samples on axis 0 and take none.",
    ),
]


class SensitivityRequest(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model_id": MODEL_ID,
                    "dataset_id": DATASET_ID,
                    "method": "hawq_v2",
                    "options": {"seed": 0, "max_probes": 128, "tolerance": 0.05},
                }
            ]
        }
    )
    model_id: str = Field(max_length=64)
    dataset_id: str = Field(max_length=64)
    method: Literal["hawq_v2", "hawq_v1", "interlayer", "fisher", "measured"] = DEFAULT_METHOD
    options: dict[str, Any] = Field(
        default_factory=dict,
        max_length=32,
        description="Options of the method's configuration (seed, tolerance, "
        "max_probes, batch_size, bits, ...); see docs/sensitivity.md.",
    )
    sample_axes: SampleAxes


class SensitivityOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: str
    job_id: str | None
    method: str
    model_sha256: str
    dataset_sha256: str
    result: SensitivityResult
    versions: dict[str, Any]
    created_at: datetime


# ---------------------------------------------------------------- shared by every job-creating route


def submit_job(request: Request, job_type: str, params: dict[str, Any], idempotency_key: str | None) -> JSONResponse:
    """Create the job row (or return the one this Idempotency-Key already made) and dispatch it."""
    state = request.app.state
    request_hash = hashlib.sha256(json.dumps([job_type, params], sort_keys=True).encode()).hexdigest()
    params = {**params, "request_sha256": request_hash}
    existing = state.db.job_by_idempotency_key(idempotency_key) if idempotency_key else None
    if existing is not None:
        return _replay(existing, request_hash)
    job = Job(type=job_type, params=params, idempotency_key=idempotency_key, owner=request_owner(request))
    if not state.db.add_job(job):  # a concurrent retry with the same key won the race
        return _replay(state.db.job_by_idempotency_key(idempotency_key), request_hash)
    state.executor.submit(job.id)
    return JSONResponse(
        JobOut.of(job).model_dump(mode="json"), status_code=202, headers={"Location": f"/v1/jobs/{job.id}"}
    )


def _replay(job: Job | None, request_hash: str) -> JSONResponse:
    if job is None or job.params.get("request_sha256") != request_hash:
        raise Problem(422, "this Idempotency-Key was already used for a different request; use a new key")
    return JSONResponse(
        JobOut.of(job).model_dump(mode="json"),
        status_code=200,
        headers={"Location": f"/v1/jobs/{job.id}", "Idempotent-Replayed": "true"},
    )


def load_inputs(request: Request, model_id: str, dataset_ids: list[str | None]) -> tuple[Model, list[Dataset | None]]:
    db: SqlStore = request.app.state.db
    model = db.get(Model, model_id)
    datasets = [db.get(Dataset, d) if d else None for d in dataset_ids]
    if model is None:
        raise Problem(422, f"model_id {model_id!r} names no model; upload it first (POST /v1/models)")
    for dataset_id, dataset in zip(dataset_ids, datasets):
        if dataset_id and dataset is None:
            raise Problem(422, f"dataset id {dataset_id!r} names no dataset; upload it first (POST /v1/datasets)")
    return model, datasets


async def check_request(
    request: Request,
    model: Model,
    method: str,
    options: dict[str, Any],
    datasets: dict[str, Dataset | None],
    plan: dict[str, Any] | None = None,
    sample_axes: dict[str, int | None] | None = None,
) -> None:
    """The checks that need the libraries, in the inspector process (the API never imports torch):
    the options, and the datasets (role -> row; absent ones None) against the model's inputs, counted
    on each input's sample axis (``service.inspection.checks.check_job_request``)."""
    state = request.app.state
    described = {role: dataset.arrays for role, dataset in datasets.items() if dataset is not None}
    try:
        await run_in_threadpool(
            state.inspector.job_request,
            state.store.local_path(model.sha256),
            model.format,
            method,
            options,
            plan,
            described,
            sample_axes,
        )
    except InvalidUpload as error:
        raise Problem(422, str(error), code=error.code) from None


# ---------------------------------------------------------------- routes

NO_JOB = {"description": "No job with this id"}
# Their content, application/problem+json, is added with the guard's errors (service/api/openapi.py).
JOB_SUBMISSION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The job this Idempotency-Key already made (header Idempotent-Replayed: true)",
        "model": JobOut,
    },
    503: {"description": "Every inspector is busy checking uploads and requests; retry after Retry-After"},
}


@router.post(
    "/sensitivity",
    status_code=202,
    response_model=JobOut,
    summary="Start a sensitivity analysis (HAWQ-V2 traces, HAWQ-V1 eigenvalues or inter-layer terms)",
    responses=JOB_SUBMISSION_RESPONSES,
)
async def create_sensitivity(
    request: Request, body: SensitivityRequest, idempotency_key: IdempotencyKey = None
) -> JSONResponse:
    model, (dataset,) = load_inputs(request, body.model_id, [body.dataset_id])
    await check_request(
        request, model, body.method, body.options, {"calibration": dataset}, sample_axes=body.sample_axes
    )
    return submit_job(request, "sensitivity", body.model_dump(), idempotency_key)


@router.get(
    "/sensitivity/{result_id}",
    response_model=SensitivityOut,
    summary="A stored sensitivity result",
    responses={404: {"description": "No sensitivity result with this id"}},
)
def get_sensitivity(request: Request, result_id: str) -> SensitivityOut:
    row = request.app.state.db.get(SensitivityResultRow, result_id)
    if row is None:
        raise Problem(404, f"no sensitivity result with id {result_id!r}")
    return SensitivityOut.model_validate(row)


@router.get("/jobs", response_model=JobPage, summary="List jobs, newest first")
def list_jobs(
    request: Request,
    status: Annotated[JobStatus | None, Query()] = None,
    type: Annotated[Literal["sensitivity", "plan", "latency"] | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=10**6)] = 0,
) -> JobPage:
    rows, total = request.app.state.db.list_jobs(status=status, job_type=type, limit=limit, offset=offset)
    return JobPage(items=[JobOut.of(r) for r in rows], total=total)


@router.get(
    "/jobs/{job_id}",
    response_model=JobOut,
    summary="One job with progress, error and log tail",
    responses={404: NO_JOB},
)
def get_job(request: Request, job_id: str) -> JobOut:
    job = request.app.state.db.get(Job, job_id)
    if job is None:
        raise Problem(404, f"no job with id {job_id!r}")
    return JobOut.of(job)


@router.post(
    "/jobs/{job_id}/cancel",
    response_model=JobOut,
    status_code=202,
    summary="Cancel a job: queued jobs stop at once, running ones at their next step",
    responses={404: NO_JOB},
)
def cancel_job(request: Request, job_id: str) -> JobOut:
    job = request.app.state.db.request_cancel(job_id)
    if job is None:
        raise Problem(404, f"no job with id {job_id!r}")
    return JobOut.of(job)

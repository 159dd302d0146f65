"""The supervisor's half of each job type: which stored files the job reads (``prepare``) and
which rows its result becomes (``store``). The other half, the computation, runs sandboxed
(``service.jobs.handlers``); only this half talks to the database and the blob store.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

from service.jobs.errors import JobInputError
from service.store.blobs import BlobStore
from service.store.sql_store import Conflict, SqlStore
from service.store.storage import delete_if_unused, store_file
from service.store.tables import (
    Artifact,
    Base,
    Dataset,
    FrontierPointRow,
    LatencyMeasurementRow,
    Model,
    Plan,
    new_id,
)


@dataclass
class JobInputs:
    """What the sandboxed process is given: the model's name and format, and the blobs it may
    read by role ("model", "calibration", "evaluation"). ``artifact``: whether it writes one."""

    model_name: str
    model_format: str
    blobs: dict[str, str]
    owner: str | None = None
    artifact: bool = False
    rows: dict[str, Any] = field(default_factory=dict)  # what ``store`` needs again (ids, names)
    # where the model's inputs hold their samples, when the job's params do not say (a latency job
    # measures a plan's artifact with the plan's own): sent to the process with the model's name
    sample_axes: dict[str, int | None] = field(default_factory=dict)


@dataclass
class Finished:
    """What ``store`` gets besides the payload."""

    job_id: str
    params: dict[str, Any]
    inputs: JobInputs
    db: SqlStore
    store: BlobStore
    sensitivity_result_id: str | None
    artifact_file: IO[bytes] | None


@dataclass(frozen=True)
class JobType:
    prepare: Callable[[SqlStore, dict[str, Any]], JobInputs]
    store: Callable[[Finished, dict[str, Any]], dict[str, Any]]


def save_rows(db: SqlStore, *rows: Base) -> None:
    """Insert rows, parents first, in one transaction (``SqlStore.insert``). A row whose parent was
    deleted while the job ran is the user's doing, said as such."""
    try:
        db.insert(*rows)
    except Conflict:
        raise JobInputError("the model or a dataset of this job was deleted while it ran; nothing was stored") from None


# ---------------------------------------------------------------- sensitivity


def _model_and_datasets(
    db: SqlStore, model_id: str, datasets: dict[str, str | None]
) -> tuple[Model, dict[str, Dataset]]:
    """The job's model and datasets (role -> id, None for absent ones); a row deleted since
    submission is the user's doing."""
    model = db.get(Model, model_id)
    if model is None:
        raise JobInputError("the model was deleted before the job ran")
    rows = {}
    for role, dataset_id in datasets.items():
        row = db.get(Dataset, dataset_id) if dataset_id else None
        if dataset_id and row is None:
            raise JobInputError(f"the {role} dataset was deleted before the job ran")
        if row is not None:
            rows[role] = row
    return model, rows


def _inputs(model: Model, datasets: dict[str, Dataset], **extra: Any) -> JobInputs:
    blobs = {"model": model.sha256, **{role: row.sha256 for role, row in datasets.items()}}
    return JobInputs(model.name, model.format, blobs, **extra)


def prepare_sensitivity(db: SqlStore, params: dict[str, Any]) -> JobInputs:
    model, datasets = _model_and_datasets(db, params["model_id"], {"calibration": params["dataset_id"]})
    return _inputs(model, datasets)


def store_sensitivity(done: Finished, payload: dict[str, Any]) -> dict[str, Any]:
    return {"sensitivity_result_id": done.sensitivity_result_id, "cached": bool(payload.get("cached"))}


# ---------------------------------------------------------------- plans


def prepare_plan(db: SqlStore, params: dict[str, Any]) -> JobInputs:
    model, datasets = _model_and_datasets(
        db,
        params["model_id"],
        {"calibration": params["calibration_dataset_id"], "evaluation": params.get("evaluation_dataset_id")},
    )
    return _inputs(model, datasets, artifact=True, rows={"model_id": model.id})


def store_plan(done: Finished, payload: dict[str, Any]) -> dict[str, Any]:
    """The artifact blob, then its row, the plan, its frontier points and its latency, in one transaction;
    if the rows cannot be stored (the model was deleted meanwhile), the blob goes too."""
    if done.artifact_file is None:
        raise RuntimeError("a plan job needs its artifact file")
    sha256 = None
    try:
        with done.store.reference_lock():
            sha256, size = store_file(done.store, done.artifact_file)
            rows = _plan_rows(done, payload["plan"], payload.get("latency"), sha256, size)
            save_rows(done.db, *rows)
    except BaseException:
        if sha256 is not None:
            delete_if_unused(done.db, done.store, sha256)
        raise
    plan_row = rows[1]
    return {
        "plan_id": plan_row.id,
        "sensitivity_result_id": done.sensitivity_result_id,
        "meets_constraints": plan_row.predicted["meets_constraints"],
    }


def _plan_rows(done: Finished, data: dict[str, Any], latency: Any, sha256: str, size: int) -> list[Any]:
    """[artifact, plan, frontier points..., latency measurement] in the order they must be inserted."""
    params = done.params
    artifact = Artifact(
        id=new_id(),
        sha256=sha256,
        size_bytes=size,
        kind="quantized_model",
        owner=done.inputs.owner,
        filename=f"{done.inputs.model_name.removesuffix('.onnx')}-mixed.onnx",
    )
    chosen = data["plan"]
    plan_row = Plan(
        id=new_id(),
        job_id=done.job_id,
        model_id=done.inputs.rows["model_id"],
        calibration_dataset_id=params["calibration_dataset_id"],
        evaluation_dataset_id=params.get("evaluation_dataset_id"),
        search=params["search"],
        request={**params, "sensitivity_result_id": done.sensitivity_result_id},
        assignment=chosen["layers"],
        predicted={**chosen["predicted"], "meets_constraints": bool(data["meets_constraints"])},
        measured=chosen["measured"] or {},
        # the sensitivity is a row of its own (request.sensitivity_result_id)
        result={key: value for key, value in data.items() if key != "sensitivity"},
        artifact_id=artifact.id,
        versions=data["run"]["versions"],
    )
    rows: list[Any] = [artifact, plan_row]
    rows += [
        FrontierPointRow(
            plan_id=plan_row.id,
            index=index,
            assignment=point["layers"],
            size_bytes=point["predicted"]["size_bytes"],
            bops=point["predicted"]["bops"],
            predicted_loss_change=_predicted_by_method(point["predicted"], params["method"]),
            predicted=point["predicted"],
            measured=point["measured"] or {},
        )
        for index, point in enumerate(data["frontier"])
    ]
    if latency is not None:
        rows.append(LatencyMeasurementRow(plan_id=plan_row.id, artifact_id=artifact.id, **latency_fields(latency)))
    return rows


def _predicted_by_method(predicted: dict[str, Any], method: str) -> float | None:
    """The predictor the plan's method optimised: Ω for HAWQ-V2, ΔL for the inter-layer objective."""
    return predicted.get("omega") if method in ("hawq_v2", "fisher", "measured") else predicted.get("loss_change")


# ---------------------------------------------------------------- latency


def prepare_latency(db: SqlStore, params: dict[str, Any]) -> JobInputs:
    plan, artifact = db.plan_with_artifact(params["plan_id"])
    calibration = db.get(Dataset, plan.calibration_dataset_id) if plan else None
    if plan is None or artifact is None or calibration is None:
        raise JobInputError("the plan, its artifact or its calibration dataset was deleted")
    # plans stored before the sample_axes field have none: the artifact's declared shapes say
    return JobInputs(
        artifact.filename,
        "onnx",
        {"model": artifact.sha256, "calibration": calibration.sha256},
        rows={"plan_id": plan.id, "artifact_id": artifact.id},
        sample_axes=dict(plan.request.get("sample_axes") or {}),
    )


LATENCY_FIELDS = {
    "mean_ms": float,
    "p50_ms": float,
    "p90_ms": float,
    "batch_size": int,
    "repeats": int,
    "device_description": str,
    "provider": str,
    "onnxruntime_version": str,
}


def latency_fields(data: Any) -> dict[str, Any]:
    """A ``planner.latency.LatencyMeasurement`` as the job process sent it, checked field by field:
    the payload comes from a process that opened a user's file and is trusted for nothing."""
    if not isinstance(data, dict) or set(data) != set(LATENCY_FIELDS):
        raise ValueError("the job process returned a malformed latency measurement")
    for name, kind in LATENCY_FIELDS.items():
        value = data[name]
        if not isinstance(value, (int, float) if kind is float else kind) or isinstance(value, bool):
            raise ValueError(f"the job process returned a malformed latency measurement ({name})")
    return {name: (float(value) if LATENCY_FIELDS[name] is float else value) for name, value in data.items()}


def store_latency(done: Finished, payload: dict[str, Any]) -> dict[str, Any]:
    row = LatencyMeasurementRow(
        plan_id=done.inputs.rows["plan_id"],
        artifact_id=done.inputs.rows["artifact_id"],
        **latency_fields(payload.get("latency")),
    )
    save_rows(done.db, row)
    return {"latency_measurement_id": row.id}


JOB_TYPES: dict[str, JobType] = {
    "sensitivity": JobType(prepare_sensitivity, store_sensitivity),
    "plan": JobType(prepare_plan, store_plan),
    "latency": JobType(prepare_latency, store_latency),
}

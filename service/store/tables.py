"""The database schema: SQLAlchemy 2 typed ORM. Migrations in migrations/ must match it.

A class named like one of the libraries' dataclasses takes a ``Row`` suffix, so that a module may use
both: ``SensitivityResultRow`` holds a ``sensitivity.results.SensitivityResult``, ``FrontierPointRow`` a
point of a plan's frontier (not ``planner.frontier.FrontierPoint``, the search's), ``LatencyMeasurementRow``
a ``planner.latency.LatencyMeasurement``. The tables keep their names.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import JSON, BigInteger, DateTime, Dialect, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, validates
from sqlalchemy.types import TypeDecorator

from service.job_status import JobStatus


def new_id() -> str:
    return uuid.uuid4().hex


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite drops the zone on the way back)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class StatusString(TypeDecorator[JobStatus]):
    """A job's status, stored as its plain string (the column is VARCHAR) and read back as a ``JobStatus``."""

    impl = String
    cache_ok = True

    def process_bind_param(self, value: JobStatus | str | None, dialect: Dialect) -> str | None:
        return None if value is None else JobStatus(value).value

    def process_result_value(self, value: str | None, dialect: Dialect) -> JobStatus | None:
        return None if value is None else JobStatus(value)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, list[Any]: JSON, datetime: UTCDateTime}


class Timestamped:
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Owned:
    """The API token that stored the row (None with auth off): what storage quotas count."""

    owner: Mapped[str | None] = mapped_column(String(32), index=True)


class Model(Timestamped, Owned, Base):
    __tablename__ = "models"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200))
    format: Mapped[str] = mapped_column(String(32))  # "onnx" | "onnx_archive" | "torch_export"
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    opset: Mapped[int | None] = mapped_column(Integer)
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)  # inputs, outputs, producer, ir_version
    layers: Mapped[list[Any]] = mapped_column(default=list)
    layer_count: Mapped[int] = mapped_column(Integer, server_default="0")  # len(layers), for lists that skip them

    @validates("layers")
    def _count_layers(self, _key: str, layers: list[Any]) -> list[Any]:
        self.layer_count = len(layers)
        return layers


class Dataset(Timestamped, Owned, Base):
    __tablename__ = "datasets"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    # the first dim every array of rank >= 1 shares, None when they differ (per-input sample axes:
    # a job counts the samples against its model; service.inspection.checks._describe_dataset)
    num_samples: Mapped[int | None] = mapped_column(Integer)
    has_labels: Mapped[bool]
    arrays: Mapped[dict[str, Any]] = mapped_column(default=dict)  # name -> {shape, dtype}


class Job(Timestamped, Owned, Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    type: Mapped[str] = mapped_column(String(32))  # "sensitivity" | "plan" | "latency"
    status: Mapped[JobStatus] = mapped_column(StatusString(16), default=JobStatus.QUEUED, index=True)
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    progress_phase: Mapped[str | None] = mapped_column(String(64))
    progress_fraction: Mapped[float] = mapped_column(Float, default=0.0)
    progress_message: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    log_tail: Mapped[str | None] = mapped_column(Text)
    worker_id: Mapped[str | None] = mapped_column(String(200))
    idempotency_key: Mapped[str | None] = mapped_column(String(200), unique=True)
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    result: Mapped[dict[str, Any]] = mapped_column(default=dict)  # ids of what the job produced
    heartbeat_at: Mapped[datetime | None] = mapped_column()
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()


class SensitivityResultRow(Timestamped, Base):
    __tablename__ = "sensitivity_results"
    __table_args__ = (Index("ix_sensitivity_cache", "model_sha256", "dataset_sha256", "method", "params_hash"),)
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    model_sha256: Mapped[str] = mapped_column(String(64))
    dataset_sha256: Mapped[str] = mapped_column(String(64))
    method: Mapped[str] = mapped_column(String(32))
    params_hash: Mapped[str] = mapped_column(String(64))
    result: Mapped[dict[str, Any]] = mapped_column(default=dict)
    versions: Mapped[dict[str, Any]] = mapped_column(default=dict)


class LatencyTableRow(Timestamped, Base):
    """A ``planner.latency_table.LatencyTable`` measured by a plan job, stored for the plans after it:
    looked up by the uploaded model's sha256 and where it was measured (device, provider, onnxruntime
    version), the batch size and the candidates; any of them differing is another row."""

    __tablename__ = "latency_tables"
    __table_args__ = (
        Index(
            "ix_latency_tables_key",
            "model_sha256",
            "device_description",
            "provider",
            "onnxruntime_version",
            "batch_size",
            "candidates",
        ),
    )
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    model_sha256: Mapped[str] = mapped_column(String(64))
    device_description: Mapped[str] = mapped_column(String(300))
    provider: Mapped[str] = mapped_column(String(64))
    onnxruntime_version: Mapped[str] = mapped_column(String(64))
    batch_size: Mapped[int] = mapped_column(Integer)
    candidates: Mapped[str] = mapped_column(String(200))  # comma-separated, in the request's order
    table: Mapped[dict[str, Any]] = mapped_column(default=dict)  # LatencyTable.to_dict()


class Artifact(Timestamped, Owned, Base):
    __tablename__ = "artifacts"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(32))  # "quantized_model"
    media_type: Mapped[str] = mapped_column(String(100), default="application/octet-stream")
    filename: Mapped[str] = mapped_column(String(200))


class Plan(Timestamped, Base):
    __tablename__ = "plans"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    calibration_dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    evaluation_dataset_id: Mapped[str | None] = mapped_column(ForeignKey("datasets.id", ondelete="SET NULL"))
    search: Mapped[str] = mapped_column(String(32))  # "frontier" | "bisection"
    request: Mapped[dict[str, Any]] = mapped_column(default=dict)  # method, candidates, constraints
    assignment: Mapped[dict[str, Any]] = mapped_column(default=dict)  # layer -> candidate
    predicted: Mapped[dict[str, Any]] = mapped_column(default=dict)
    measured: Mapped[dict[str, Any]] = mapped_column(default=dict)  # the chosen configuration's Measurement
    artifact_id: Mapped[str | None] = mapped_column(ForeignKey("artifacts.id", ondelete="SET NULL"))
    versions: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # planner.PlanResult.to_dict() less its sensitivity (a row of its own): the run's metadata, the
    # uniform points, exclusions and layer nodes live here, never among the measurements (0008)
    result: Mapped[dict[str, Any]] = mapped_column(default=dict, server_default="{}")


class FrontierPointRow(Base):
    __tablename__ = "frontier_points"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    plan_id: Mapped[str] = mapped_column(ForeignKey("plans.id", ondelete="CASCADE"), index=True)
    index: Mapped[int] = mapped_column(Integer)
    assignment: Mapped[dict[str, Any]] = mapped_column(default=dict)
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    bops: Mapped[float | None] = mapped_column(Float)
    predicted_loss_change: Mapped[float | None] = mapped_column(Float)  # by the plan's method
    predicted: Mapped[dict[str, Any]] = mapped_column(default=dict, server_default="{}")  # both predictors
    measured: Mapped[dict[str, Any]] = mapped_column(default=dict)  # metric, baseline, drop, latency
    artifact_id: Mapped[str | None] = mapped_column(ForeignKey("artifacts.id", ondelete="SET NULL"))


class LatencyMeasurementRow(Timestamped, Base):
    __tablename__ = "latency_measurements"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    plan_id: Mapped[str | None] = mapped_column(ForeignKey("plans.id", ondelete="CASCADE"), index=True)
    artifact_id: Mapped[str | None] = mapped_column(ForeignKey("artifacts.id", ondelete="CASCADE"))
    mean_ms: Mapped[float] = mapped_column(Float)
    p50_ms: Mapped[float] = mapped_column(Float)
    p90_ms: Mapped[float] = mapped_column(Float)
    batch_size: Mapped[int] = mapped_column(Integer)
    repeats: Mapped[int] = mapped_column(Integer)
    device_description: Mapped[str] = mapped_column(Text)
    provider: Mapped[str] = mapped_column(String(100))
    onnxruntime_version: Mapped[str] = mapped_column(String(32))


class ApiToken(Timestamped, Base):
    __tablename__ = "api_tokens"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 of the whole token
    prefix: Mapped[str] = mapped_column(String(16))  # shown in listings to tell tokens apart
    last_used_at: Mapped[datetime | None] = mapped_column()
    revoked_at: Mapped[datetime | None] = mapped_column()


class Readiness(Base):
    """One row (id 1) that /readyz updates: proof that the database takes writes, which a read-only,
    full or fenced-off database does not (a SELECT would still succeed)."""

    __tablename__ = "readiness"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    checked_at: Mapped[datetime] = mapped_column()

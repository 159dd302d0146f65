"""Every ORM query of the service, in one class (as MLflow's ``SqlAlchemyStore``).

The API, the dashboard, the executors, the supervisor and the CLI ask ``SqlStore`` for rows and
transitions; none of them builds a query. Each method is one short transaction of its own: rows come
back detached with their columns loaded (``expire_on_commit=False``), never lazily loading later.

Job transitions are conditional UPDATEs, so two workers can never both claim a job and a finished
job is never resurrected::

    queued -> running -> succeeded | failed | cancelled  (service.job_status)
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import CursorResult, Select, func, select, text, union, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, defer, sessionmaker

from service.job_status import JobStatus
from service.store.db import retrying
from service.store.tables import (
    ApiToken,
    Artifact,
    Base,
    Dataset,
    FrontierPointRow,
    Job,
    LatencyMeasurementRow,
    LatencyTableRow,
    Model,
    Plan,
    Readiness,
    SensitivityResultRow,
    utcnow,
)

logger = logging.getLogger("mpq.store")
Row = TypeVar("Row", bound=Base)
_ID = re.compile(r"[0-9a-f]{32}")  # tables.new_id's
Upload = Model | Dataset
# the rows that reference blobs: what decides whether a blob is still in use, and what quotas count
REFERENCING_TABLES: tuple[type[Model] | type[Dataset] | type[Artifact], ...] = (Model, Dataset, Artifact)


class Conflict(Exception):
    """The database refused a write: a parent row was deleted meanwhile, or a unique value is taken."""


class InUse(Exception):
    """The model or dataset is read by queued or running jobs (their ids in ``job_ids``)."""

    def __init__(self, job_ids: list[str]) -> None:
        super().__init__(f"{len(job_ids)} queued or running jobs use it")
        self.job_ids = job_ids


def is_id(value: object) -> bool:
    return isinstance(value, str) and _ID.fullmatch(value) is not None


def get_row(session: Session, table: type[Row], row_id: str | None) -> Row | None:
    """The row with this id, or None; a string that cannot be an id (wrong length, NUL bytes, ...)
    never reaches the database."""
    if not is_id(row_id):
        return None
    return session.get(table, row_id)


class SqlStore:
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    # ------------------------------------------------------------ any row

    def get(self, table: type[Row], row_id: str | None) -> Row | None:
        """The row with this id, or None (also for a string that cannot be an id)."""
        with self.sessions() as session:
            return get_row(session, table, row_id)

    def insert(self, *rows: Base) -> None:
        """Insert rows in the given order (parents first: without ORM relationships the unit of work does
        not sort by foreign keys) in one transaction, retried if the connection drops. ``Conflict`` when
        a parent is gone (deleted meanwhile)."""

        def attempt() -> None:
            with self.sessions() as session, session.begin():
                for row in rows:
                    session.add(row)
                    session.flush()

        try:
            retrying(attempt)
        except IntegrityError as error:
            raise Conflict(str(error.orig)) from error

    def _page(self, query: Select[Row], order: Any, limit: int, offset: int) -> tuple[list[Row], int]:
        """One page of a query's rows, and how many rows the query has."""
        with self.sessions() as session:
            total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
            rows = session.scalars(query.order_by(order).limit(limit).offset(offset)).all()
        return list(rows), total

    # ------------------------------------------------------------ models and datasets

    def list_uploads(
        self,
        table: type[Upload],
        *,
        sha256: str | None = None,
        limit: int = 50,
        offset: int = 0,
        unlisted: Sequence[str] = (),
    ) -> tuple[list[Upload], int]:
        """A page of models or datasets, newest first; ``unlisted`` columns are not even loaded."""
        query: Select[Any] = select(table).options(*(defer(getattr(table, column)) for column in unlisted))
        if sha256:
            query = query.where(table.sha256 == sha256)
        return self._page(query, table.created_at.desc(), limit, offset)

    def model_names_by_sha256(self, hashes: Iterable[str]) -> dict[str, str]:
        with self.sessions() as session:
            return {m.sha256: m.name for m in session.scalars(select(Model).where(Model.sha256.in_(set(hashes))))}

    def model_names_by_id(self, ids: Iterable[str]) -> dict[str, str]:
        with self.sessions() as session:
            return {m.id: m.name for m in session.scalars(select(Model).where(Model.id.in_(set(ids))))}

    def model_by_sha256(self, sha256: str) -> Model | None:
        with self.sessions() as session:
            return session.scalars(select(Model).where(Model.sha256 == sha256)).first()

    def delete_upload(self, table: type[Upload], row_id: str) -> list[str] | None:
        """Delete a model or dataset with the plans made from it (the database cascades them) and those
        plans' artifacts (which it would orphan); returns the blobs that may now be unused, None if there
        is no such row. ``InUse`` (nothing deleted) while queued or running jobs read it."""
        with self.sessions() as session, session.begin():
            row = get_row(session, table, row_id)
            if row is None:
                return None
            busy = _jobs_using(session, row)
            if busy:
                raise InUse(busy)
            plan_column = Plan.model_id if isinstance(row, Model) else Plan.calibration_dataset_id
            plan_ids = list(session.scalars(select(Plan.id).where(plan_column == row.id)))
            artifact_ids = set(session.scalars(select(Plan.artifact_id).where(Plan.id.in_(plan_ids))))
            artifact_ids |= set(
                session.scalars(select(FrontierPointRow.artifact_id).where(FrontierPointRow.plan_id.in_(plan_ids)))
            )
            artifacts = session.scalars(select(Artifact).where(Artifact.id.in_(artifact_ids - {None}))).all()
            hashes = [row.sha256, *(artifact.sha256 for artifact in artifacts)]
            session.delete(row)
            session.flush()  # the plans go first: they reference the artifacts
            for artifact in artifacts:
                session.delete(artifact)
        return hashes

    # ------------------------------------------------------------ blobs and quotas

    def blob_in_use(self, sha256: str) -> bool:
        """Whether any row still references the blob (uploads are deduplicated by content)."""
        with self.sessions() as session:
            return any(
                session.scalar(select(func.count()).select_from(table).where(table.sha256 == sha256))
                for table in REFERENCING_TABLES
            )

    def referenced_blobs(self) -> set[str]:
        with self.sessions() as session:
            return set(session.scalars(union(*(select(table.sha256) for table in REFERENCING_TABLES))))

    def stored_bytes(self, owner: str | None = None, *, everyone: bool = False) -> int:
        """Bytes of the models, datasets and artifacts ``owner`` stored (all owners with ``everyone``);
        a blob shared by two rows counts twice: each owner pays for what they stored."""
        total = 0
        with self.sessions() as session:
            for table in REFERENCING_TABLES:
                query = select(func.coalesce(func.sum(table.size_bytes), 0))
                if not everyone:
                    query = query.where(table.owner.is_(None) if owner is None else table.owner == owner)
                total += int(session.scalar(query) or 0)
        return total

    # ------------------------------------------------------------ jobs: submission and reading

    def add_job(self, job: Job) -> bool:
        """Insert a new job; False when its idempotency key is taken (a concurrent retry won)."""
        try:
            with self.sessions() as session, session.begin():
                session.add(job)
        except IntegrityError:
            return False
        return True

    def job_by_idempotency_key(self, key: str) -> Job | None:
        with self.sessions() as session:
            return session.scalars(select(Job).where(Job.idempotency_key == key)).first()

    def list_jobs(
        self, *, status: JobStatus | None = None, job_type: str | None = None, limit: int = 50, offset: int = 0
    ) -> tuple[list[Job], int]:
        """A page of jobs, newest first."""
        query = select(Job)
        if status:
            query = query.where(Job.status == status)
        if job_type:
            query = query.where(Job.type == job_type)
        return self._page(query, Job.created_at.desc(), limit, offset)

    def queued_job_ids(self, limit: int | None = None) -> list[str]:
        """Queued jobs, oldest first."""
        with self.sessions() as session:
            return list(
                session.scalars(
                    select(Job.id).where(Job.status == JobStatus.QUEUED).order_by(Job.created_at).limit(limit)
                )
            )

    def running_jobs(self, *, silent_since: datetime | None = None) -> list[Job]:
        """Running jobs; with ``silent_since``, those whose last heartbeat is older."""
        query = select(Job).where(Job.status == JobStatus.RUNNING)
        if silent_since is not None:
            query = query.where(Job.heartbeat_at < silent_since)
        with self.sessions() as session:
            return list(session.scalars(query))

    def cancel_requested(self, job_id: str) -> bool:
        with self.sessions() as session:
            return bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))

    # ------------------------------------------------------------ jobs: transitions

    def claim_job(self, job_id: str, worker: str) -> Job | None:
        """queued -> running, atomically; None if someone else has it or it was cancelled."""

        def attempt() -> Job | None:
            now = utcnow()
            with self.sessions() as session, session.begin():
                claimed = _rowcount(
                    session.execute(
                        update(Job)
                        .where(Job.id == job_id, Job.status == JobStatus.QUEUED)
                        .values(
                            status=JobStatus.RUNNING,
                            worker_id=worker,
                            started_at=now,
                            heartbeat_at=now,
                            attempts=Job.attempts + 1,
                            progress_phase="starting",
                            error=None,
                        )
                    )
                )
                if claimed:
                    return session.get(Job, job_id)
                # a retry after a dropped connection may find its own earlier claim committed
                job = session.get(Job, job_id)
                return job if job is not None and job.status == JobStatus.RUNNING and job.worker_id == worker else None

        return retrying(attempt)

    def finish_job(
        self,
        job_id: str,
        status: JobStatus,
        *,
        error: str | None = None,
        result: dict[str, Any] | None = None,
        log_tail: str | None = None,
        only_worker: str | None = None,
    ) -> bool:
        """running|queued -> a finished state. Returns whether this call made the transition."""
        values: dict[str, Any] = {"status": status, "finished_at": utcnow(), "error": error}
        if status == JobStatus.SUCCEEDED:
            values.update(progress_fraction=1.0, progress_phase="done")
        if result is not None:
            values["result"] = result
        if log_tail is not None:
            values["log_tail"] = log_tail
        condition = [Job.id == job_id, Job.status.in_((JobStatus.QUEUED, JobStatus.RUNNING))]
        if only_worker is not None:
            condition.append(Job.worker_id == only_worker)

        def attempt() -> bool:
            with self.sessions() as session, session.begin():
                return bool(_rowcount(session.execute(update(Job).where(*condition).values(**values))))

        return retrying(attempt)

    def request_cancel(self, job_id: str) -> Job | None:
        """A queued job is cancelled at once; a running one gets the flag its supervisor checks."""
        with self.sessions() as session, session.begin():
            job = get_row(session, Job, job_id)
            if job is None:
                return None
            if job.status == JobStatus.QUEUED:
                job.status, job.finished_at, job.cancel_requested = JobStatus.CANCELLED, utcnow(), True
            elif job.status == JobStatus.RUNNING:
                job.cancel_requested = True
            return job

    def requeue_or_fail(self, job: Job, reason: str, max_attempts: int) -> JobStatus:
        """A running job whose worker is gone: back to the queue while attempts remain, else failed."""
        values: dict[str, Any]
        if job.cancel_requested:
            new_status, values = JobStatus.CANCELLED, {"finished_at": utcnow(), "error": f"cancelled; {reason}"}
        elif job.attempts < max_attempts:
            new_status = JobStatus.QUEUED
            values = {"worker_id": None, "progress_phase": "requeued", "progress_message": reason, "heartbeat_at": None}
        else:
            new_status = JobStatus.FAILED
            values = {"finished_at": utcnow(), "error": f"{reason} (after {job.attempts} attempts)"}
        with self.sessions() as session, session.begin():
            moved = _rowcount(
                session.execute(
                    update(Job)
                    .where(Job.id == job.id, Job.status == JobStatus.RUNNING, Job.worker_id == job.worker_id)
                    .values(status=new_status, **values)
                )
            )
        if moved:
            logger.warning("job %s: %s -> %s", job.id, reason, new_status)
        return new_status if moved else job.status

    def requeue_after_shutdown(self, job_id: str, worker: str) -> JobStatus | None:
        """The server stopped the job on purpose: back to the queue, and the attempt does not count.
        Returns the job's status after (None if it is gone)."""
        with self.sessions() as session, session.begin():
            moved = _rowcount(
                session.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.status == JobStatus.RUNNING, Job.worker_id == worker)
                    .values(
                        status=JobStatus.QUEUED,
                        worker_id=None,
                        heartbeat_at=None,
                        progress_phase="requeued",
                        progress_message="the server shut down",
                        attempts=Job.attempts - 1,
                    )
                )
            )
            if moved:
                return JobStatus.QUEUED
            return session.scalar(select(Job.status).where(Job.id == job_id))

    def report_progress(self, job_id: str, phase: str, fraction: float, message: str) -> None:
        """The running job's progress (a job no longer running keeps what it had)."""

        def write() -> None:
            with self.sessions() as session, session.begin():
                session.execute(
                    update(Job)
                    .where(Job.id == job_id, Job.status == JobStatus.RUNNING)
                    .values(progress_phase=phase, progress_fraction=fraction, progress_message=message[:2000])
                )

        retrying(write)

    def heartbeat(self, job_id: str, log_tail: str, *, deadline_s: float) -> bool:
        """Keep the job's heartbeat and log tail fresh; returns whether a cancel was requested (or the
        job is gone)."""

        def write() -> bool:
            with self.sessions() as session, session.begin():
                job = session.get(Job, job_id)
                if job is None:
                    return True
                job.heartbeat_at = utcnow()
                job.log_tail = log_tail
                return bool(job.cancel_requested)

        return retrying(write, deadline_s=deadline_s)

    # ------------------------------------------------------------ sensitivity results

    def find_sensitivity(
        self, model_sha256: str, dataset_sha256: str, method: str, params_hash: str
    ) -> SensitivityResultRow | None:
        """The newest stored result of this analysis on these files, if any."""
        with self.sessions() as session:
            return session.scalars(
                select(SensitivityResultRow)
                .where(
                    SensitivityResultRow.model_sha256 == model_sha256,
                    SensitivityResultRow.dataset_sha256 == dataset_sha256,
                    SensitivityResultRow.method == method,
                    SensitivityResultRow.params_hash == params_hash,
                )
                .order_by(SensitivityResultRow.created_at.desc())
            ).first()

    def sensitivity_results(
        self, *, model_sha256: str | None = None, limit: int | None = None
    ) -> list[SensitivityResultRow]:
        """Stored results, newest first (of one model's file, with ``model_sha256``)."""
        query = select(SensitivityResultRow)
        if model_sha256 is not None:
            query = query.where(SensitivityResultRow.model_sha256 == model_sha256)
        with self.sessions() as session:
            return list(session.scalars(query.order_by(SensitivityResultRow.created_at.desc()).limit(limit)))

    # ------------------------------------------------------------ latency tables

    def find_latency_table(
        self,
        model_sha256: str,
        *,
        device_description: str,
        provider: str,
        onnxruntime_version: str,
        batch_size: int,
        candidates: str,
    ) -> LatencyTableRow | None:
        """The newest latency table of this model file measured on this device, provider and
        onnxruntime version at this batch size for these candidates (comma-separated), if any."""
        with self.sessions() as session:
            return session.scalars(
                select(LatencyTableRow)
                .where(
                    LatencyTableRow.model_sha256 == model_sha256,
                    LatencyTableRow.device_description == device_description,
                    LatencyTableRow.provider == provider,
                    LatencyTableRow.onnxruntime_version == onnxruntime_version,
                    LatencyTableRow.batch_size == batch_size,
                    LatencyTableRow.candidates == candidates,
                )
                .order_by(LatencyTableRow.created_at.desc())
            ).first()

    def latency_tables(self, model_sha256: str, *, limit: int | None = 50) -> list[LatencyTableRow]:
        """A model file's stored latency tables, newest first."""
        query = select(LatencyTableRow).where(LatencyTableRow.model_sha256 == model_sha256)
        with self.sessions() as session:
            return list(session.scalars(query.order_by(LatencyTableRow.created_at.desc()).limit(limit)))

    # ------------------------------------------------------------ plans

    def list_plans(
        self, *, model_id: str | None = None, limit: int | None = 50, offset: int = 0
    ) -> tuple[list[tuple[Plan, Artifact | None]], int]:
        """A page of plans with their artifacts, newest first."""
        query = select(Plan, Artifact).outerjoin(Artifact, Artifact.id == Plan.artifact_id)
        if model_id:
            query = query.where(Plan.model_id == model_id)
        with self.sessions() as session:
            total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
            rows = session.execute(query.order_by(Plan.created_at.desc()).limit(limit).offset(offset))
            return [(plan, artifact) for plan, artifact in rows], total

    def plan_with_artifact(self, plan_id: str) -> tuple[Plan | None, Artifact | None]:
        with self.sessions() as session:
            plan = get_row(session, Plan, plan_id)
            artifact = session.get(Artifact, plan.artifact_id) if plan and plan.artifact_id else None
        return plan, artifact

    def frontier(self, plan_id: str) -> list[FrontierPointRow]:
        with self.sessions() as session:
            return list(
                session.scalars(
                    select(FrontierPointRow).where(FrontierPointRow.plan_id == plan_id).order_by(FrontierPointRow.index)
                )
            )

    def frontier_point(self, plan_id: str, index: int) -> FrontierPointRow | None:
        if len(plan_id) > 64:
            return None
        with self.sessions() as session:
            return session.scalars(
                select(FrontierPointRow).where(FrontierPointRow.plan_id == plan_id, FrontierPointRow.index == index)
            ).first()

    def latency_measurements(self, plan_id: str, *, by_device: bool = False) -> list[LatencyMeasurementRow]:
        """The plan's measurements, oldest first (grouped by device with ``by_device``)."""
        order = (LatencyMeasurementRow.device_description,) if by_device else ()
        with self.sessions() as session:
            return list(
                session.scalars(
                    select(LatencyMeasurementRow)
                    .where(LatencyMeasurementRow.plan_id == plan_id)
                    .order_by(*order, LatencyMeasurementRow.created_at)
                )
            )

    def latency_counts(self, plan_ids: Iterable[str] | None = None) -> dict[str, int]:
        """Plan id -> its number of latency measurements (every plan that has any, or of ``plan_ids``)."""
        query = select(LatencyMeasurementRow.plan_id, func.count()).group_by(LatencyMeasurementRow.plan_id)
        if plan_ids is not None:
            query = query.where(LatencyMeasurementRow.plan_id.in_(set(plan_ids)))
        with self.sessions() as session:
            return {plan_id: count for plan_id, count in session.execute(query) if plan_id is not None}

    def plans(
        self, *, ids: Iterable[str] | None = None, model_id: str | None = None, limit: int | None = None
    ) -> list[Plan]:
        """Plans, newest first: those with these ids, or of this model."""
        query = select(Plan)
        if ids is not None:
            query = query.where(Plan.id.in_(set(ids)))
        if model_id is not None:
            query = query.where(Plan.model_id == model_id)
        with self.sessions() as session:
            return list(session.scalars(query.order_by(Plan.created_at.desc()).limit(limit)))

    # ------------------------------------------------------------ API tokens

    def add_token(self, row: ApiToken) -> ApiToken:
        with self.sessions() as session, session.begin():
            session.add(row)
        return row

    def use_token(self, token_hash: str) -> ApiToken | None:
        """The live token with this hash (its last use recorded), or None when unknown or revoked."""
        with self.sessions() as session, session.begin():
            row = session.scalars(select(ApiToken).where(ApiToken.token_hash == token_hash)).first()
            if row is None or row.revoked_at is not None:
                return None
            row.last_used_at = utcnow()
            return row

    def token_id(self, token_hash: str) -> str | None:
        """The id of the token with this hash (revoked or not): who owns what a request stores."""
        with self.sessions() as session:
            return session.scalar(select(ApiToken.id).where(ApiToken.token_hash == token_hash))

    def tokens(self) -> list[ApiToken]:
        with self.sessions() as session:
            return list(session.scalars(select(ApiToken).order_by(ApiToken.created_at)))

    def revoke_token(self, token_id: str) -> bool:
        """Revoke a token (a revoked one keeps its first revocation time); False if there is none."""
        with self.sessions() as session, session.begin():
            row = get_row(session, ApiToken, token_id)
            if row is None:
                return False
            row.revoked_at = row.revoked_at or utcnow()
        return True

    # ------------------------------------------------------------ readiness

    def readiness(self) -> str:
        """ "ok", or why not: a read, then a real write in a transaction (a read-only or full database
        answers reads only)."""
        with self.sessions() as session:
            try:
                session.execute(text("SELECT 1"))
            except Exception as error:
                return f"unreachable: {type(error).__name__}"
            try:
                written = _rowcount(
                    session.execute(update(Readiness).where(Readiness.id == 1).values(checked_at=utcnow()))
                )
                if not written:  # a schema made without the migrations' row
                    session.add(Readiness(id=1, checked_at=utcnow()))
                session.commit()
            except Exception as error:
                return f"not writable: {type(error).__name__}"
        return "ok"


def _jobs_using(session: Session, row: Upload) -> list[str]:
    """Ids of the queued and running jobs that read this model or dataset (directly, or through a plan
    whose artifact they measure)."""
    is_model = isinstance(row, Model)
    keys = ("model_id",) if is_model else ("dataset_id", "calibration_dataset_id", "evaluation_dataset_id")
    plan_column = Plan.model_id if is_model else Plan.calibration_dataset_id
    plans = set(session.scalars(select(Plan.id).where(plan_column == row.id)))
    active = session.scalars(select(Job).where(Job.status.in_((JobStatus.QUEUED, JobStatus.RUNNING)))).all()
    return [
        job.id
        for job in active
        if any(job.params.get(key) == row.id for key in keys) or job.params.get("plan_id") in plans
    ]


def _rowcount(result: Any) -> int:
    """The rows an UPDATE matched (``Session.execute`` is typed as returning a plain Result)."""
    assert isinstance(result, CursorResult)
    return result.rowcount

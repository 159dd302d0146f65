"""Jobs as database rows, the single source of truth.

    queued -> running -> succeeded | failed | cancelled  (service.job_status)

Every transition is one conditional UPDATE, so two workers can never both claim a job and
a finished job is never resurrected. ``service.jobs.supervisor`` runs one job (and alone writes its rows); ``service.jobs.executor`` decides
which jobs run where.
"""

from __future__ import annotations

import logging
import os
import socket
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from service.job_status import JobStatus
from service.settings import Settings
from service.store.db import retrying
from service.store.tables import Job, utcnow

logger = logging.getLogger("mpq.jobs")


class Cancelled(Exception):
    """Raised inside a job when a cancel was requested; the job ends ``cancelled``."""


class JobInputError(Exception):
    """The job's inputs are wrong (the user's problem, not ours): the message is shown as is.

    ``code`` goes into the job's result (``error_code``) for clients: "bad_input", or
    "infeasible" when no configuration meets the constraints.
    """

    def __init__(self, message: str, code: str = "bad_input") -> None:
        super().__init__(message)
        self.code = code


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


# ---------------------------------------------------------------- transitions


def claim(sessions: sessionmaker[Session], job_id: str, worker: str) -> Job | None:
    """queued -> running, atomically; None if someone else has it or it was cancelled."""

    def attempt() -> Job | None:
        now = utcnow()
        with sessions() as session, session.begin():
            claimed = session.execute(
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
            ).rowcount
            if claimed:
                return session.get(Job, job_id)
            # a retry after a dropped connection may find its own earlier claim committed
            job = session.get(Job, job_id)
            return job if job is not None and job.status == JobStatus.RUNNING and job.worker_id == worker else None

    return retrying(attempt)


def finish(
    sessions: sessionmaker[Session],
    job_id: str,
    status: str,
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
        with sessions() as session, session.begin():
            return bool(session.execute(update(Job).where(*condition).values(**values)).rowcount)

    return retrying(attempt)


def request_cancel(sessions: sessionmaker[Session], job_id: str) -> Job | None:
    """A queued job is cancelled at once; a running one gets the flag its worker checks."""
    with sessions() as session, session.begin():
        job = session.get(Job, job_id)
        if job is None:
            return None
        if job.status == JobStatus.QUEUED:
            job.status, job.finished_at, job.cancel_requested = JobStatus.CANCELLED, utcnow(), True
        elif job.status == JobStatus.RUNNING:
            job.cancel_requested = True
        return job


def requeue_or_fail(sessions: sessionmaker[Session], job: Job, reason: str, max_attempts: int) -> str:
    """A running job whose worker is gone: back to the queue while attempts remain, else failed."""
    with sessions() as session, session.begin():
        if job.cancel_requested:
            new_status, values = JobStatus.CANCELLED, {"finished_at": utcnow(), "error": f"cancelled; {reason}"}
        elif job.attempts < max_attempts:
            new_status, values = (
                JobStatus.QUEUED,
                {"worker_id": None, "progress_phase": "requeued", "progress_message": reason, "heartbeat_at": None},
            )
        else:
            new_status, values = (
                JobStatus.FAILED,
                {"finished_at": utcnow(), "error": f"{reason} (after {job.attempts} attempts)"},
            )
        moved = session.execute(
            update(Job)
            .where(Job.id == job.id, Job.status == JobStatus.RUNNING, Job.worker_id == job.worker_id)
            .values(status=new_status, **values)
        ).rowcount
    if moved:
        logger.warning("job %s: %s -> %s", job.id, reason, new_status)
    return new_status if moved else job.status


def requeue_after_shutdown(sessions: sessionmaker[Session], job: Job) -> None:
    """The server stopped the job on purpose: back to the queue, and the attempt does not count."""
    with sessions() as session, session.begin():
        session.execute(
            update(Job)
            .where(Job.id == job.id, Job.status == JobStatus.RUNNING, Job.worker_id == job.worker_id)
            .values(
                status=JobStatus.QUEUED,
                worker_id=None,
                heartbeat_at=None,
                progress_phase="requeued",
                progress_message="the server shut down",
                attempts=Job.attempts - 1,
            )
        )


def reap_stale(sessions: sessionmaker[Session], settings: Settings) -> list[tuple[str, str]]:
    """Running jobs whose heartbeat stopped: requeue or fail them. Returns (job id, new status)."""
    cutoff = utcnow() - timedelta(seconds=settings.heartbeat_timeout_s)
    with sessions() as session:
        stale = session.scalars(select(Job).where(Job.status == JobStatus.RUNNING, Job.heartbeat_at < cutoff)).all()
    reason = f"the worker stopped sending heartbeats for over {settings.heartbeat_timeout_s:.0f} s"
    return [(job.id, requeue_or_fail(sessions, job, reason, settings.max_attempts)) for job in stale]

"""Jobs as database rows, the single source of truth.

    queued -> running -> succeeded | failed | cancelled

Every transition is one conditional UPDATE, so two workers can never both claim a job and
a finished job is never resurrected. ``run_job`` executes one job inside a worker process;
``supervise`` (service/executor.py) watches that process from outside.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from service.db import retrying
from service.settings import Settings
from service.tables import Job, utcnow

logger = logging.getLogger("mpq.jobs")

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
FINISHED = (SUCCEEDED, FAILED, CANCELLED)
LOG_TAIL_LINES = 200


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


@dataclass
class JobContext:
    """What a handler gets: its parameters, the store, and progress/cancel plumbing."""

    job_id: str
    params: dict[str, Any]
    settings: Settings
    sessions: sessionmaker[Session]
    store: Any
    cancel_event: threading.Event = field(default_factory=threading.Event)
    log_lines: deque[str] = field(default_factory=lambda: deque(maxlen=LOG_TAIL_LINES))
    min_progress_interval_s: float = 0.5
    _last_phase: str | None = None
    _last_write: float = 0.0

    def progress(self, phase: str, fraction: float, message: str = "") -> None:
        """Record progress and stop here if a cancel was requested.

        Libraries may report every probe; the row is written at most every
        ``min_progress_interval_s`` unless the phase changes.
        """
        self.check_cancelled()
        fraction = min(max(float(fraction), 0.0), 1.0)
        now = time.monotonic()
        if phase == self._last_phase and now - self._last_write < self.min_progress_interval_s:
            return
        self._last_phase, self._last_write = phase, now

        def write() -> None:
            with self.sessions() as session, session.begin():
                session.execute(update(Job).where(Job.id == self.job_id, Job.status == RUNNING).values(
                    progress_phase=phase[:64], progress_fraction=fraction, progress_message=message[:2000]))

        retrying(write)
        self.log(f"[{phase}] {fraction:.0%} {message}".rstrip())

    def save(self, *rows: Any) -> None:
        """Insert rows in the given order (parents first: without ORM relationships the unit of
        work does not sort by foreign keys) in one transaction, retried if the connection drops."""

        def attempt() -> None:
            with self.sessions() as session, session.begin():
                for row in rows:
                    session.add(row)
                    session.flush()

        retrying(attempt)

    def log(self, line: str) -> None:
        self.log_lines.append(line)

    def check_cancelled(self) -> None:
        if self.cancel_event.is_set():
            raise Cancelled()


Handler = Callable[[JobContext], dict[str, Any]]
HANDLERS: dict[str, Handler] = {}


def job_handler(job_type: str) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        HANDLERS[job_type] = handler
        return handler

    return register


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


# ---------------------------------------------------------------- transitions


def claim(sessions: sessionmaker[Session], job_id: str, worker: str) -> Job | None:
    """queued -> running, atomically; None if someone else has it or it was cancelled."""

    def attempt() -> Job | None:
        now = utcnow()
        with sessions() as session, session.begin():
            claimed = session.execute(update(Job).where(Job.id == job_id, Job.status == QUEUED).values(
                status=RUNNING, worker_id=worker, started_at=now, heartbeat_at=now, attempts=Job.attempts + 1,
                progress_phase="starting", error=None)).rowcount
            if claimed:
                return session.get(Job, job_id)
            # a retry after a dropped connection may find its own earlier claim committed
            job = session.get(Job, job_id)
            return job if job is not None and job.status == RUNNING and job.worker_id == worker else None

    return retrying(attempt)


def finish(sessions: sessionmaker[Session], job_id: str, status: str, *, error: str | None = None,
           result: dict[str, Any] | None = None, log_tail: str | None = None, only_worker: str | None = None) -> bool:
    """running|queued -> a finished state. Returns whether this call made the transition."""
    values: dict[str, Any] = {"status": status, "finished_at": utcnow(), "error": error}
    if status == SUCCEEDED:
        values.update(progress_fraction=1.0, progress_phase="done")
    if result is not None:
        values["result"] = result
    if log_tail is not None:
        values["log_tail"] = log_tail
    condition = [Job.id == job_id, Job.status.in_((QUEUED, RUNNING))]
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
        if job.status == QUEUED:
            job.status, job.finished_at, job.cancel_requested = CANCELLED, utcnow(), True
        elif job.status == RUNNING:
            job.cancel_requested = True
        return job


def requeue_or_fail(sessions: sessionmaker[Session], job: Job, reason: str, max_attempts: int) -> str:
    """A running job whose worker is gone: back to the queue while attempts remain, else failed."""
    with sessions() as session, session.begin():
        if job.cancel_requested:
            new_status, values = CANCELLED, {"finished_at": utcnow(), "error": f"cancelled; {reason}"}
        elif job.attempts < max_attempts:
            new_status, values = QUEUED, {"worker_id": None, "progress_phase": "requeued",
                                          "progress_message": reason, "heartbeat_at": None}
        else:
            new_status, values = FAILED, {"finished_at": utcnow(),
                                          "error": f"{reason} (after {job.attempts} attempts)"}
        moved = session.execute(update(Job).where(Job.id == job.id, Job.status == RUNNING,
                                                  Job.worker_id == job.worker_id)
                                .values(status=new_status, **values)).rowcount
    if moved:
        logger.warning("job %s: %s -> %s", job.id, reason, new_status)
    return new_status if moved else job.status


def requeue_after_shutdown(sessions: sessionmaker[Session], job: Job) -> None:
    """The server stopped the job on purpose: back to the queue, and the attempt does not count."""
    with sessions() as session, session.begin():
        session.execute(update(Job).where(Job.id == job.id, Job.status == RUNNING, Job.worker_id == job.worker_id)
                        .values(status=QUEUED, worker_id=None, heartbeat_at=None, progress_phase="requeued",
                                progress_message="the server shut down", attempts=Job.attempts - 1))


def reap_stale(sessions: sessionmaker[Session], settings: Settings) -> list[tuple[str, str]]:
    """Running jobs whose heartbeat stopped: requeue or fail them. Returns (job id, new status)."""
    cutoff = utcnow() - timedelta(seconds=settings.heartbeat_timeout_s)
    with sessions() as session:
        stale = session.scalars(select(Job).where(Job.status == RUNNING, Job.heartbeat_at < cutoff)).all()
    reason = f"the worker stopped sending heartbeats for over {settings.heartbeat_timeout_s:.0f} s"
    return [(job.id, requeue_or_fail(sessions, job, reason, settings.max_attempts)) for job in stale]


# ---------------------------------------------------------------- running one job (in a worker process)


class Heartbeat(threading.Thread):
    """Keeps heartbeat_at fresh and turns the cancel flag into an event the job sees."""

    def __init__(self, context: JobContext, interval_s: float) -> None:
        super().__init__(daemon=True, name=f"heartbeat-{context.job_id}")
        self.context = context
        self.interval_s = interval_s
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval_s):
            try:
                self.beat()
            except Exception:  # a lost database connection: try again next beat
                logger.exception("heartbeat failed for job %s", self.context.job_id)

    def beat(self) -> None:
        with self.context.sessions() as session, session.begin():
            job = session.get(Job, self.context.job_id)
            if job is None:
                return
            job.heartbeat_at = utcnow()
            job.log_tail = "\n".join(self.context.log_lines)[-20000:]
            if job.cancel_requested:
                self.context.cancel_event.set()


def run_job(job_id: str, settings: Settings, worker: str | None = None) -> str:
    """Claim and execute one job; returns its final status (or 'skipped' if not claimable)."""
    from service.db import make_engine, session_factory
    from service.store import LocalBlobStore

    _import_handlers()
    worker = worker or worker_id()
    engine = make_engine(settings.resolved_database_url)
    sessions = session_factory(engine)
    try:
        job = claim(sessions, job_id, worker)
        if job is None:
            return "skipped"
        context = JobContext(job_id, dict(job.params), settings, sessions,
                             LocalBlobStore(settings.resolved_artifact_dir))
        return _execute(context, job.type, worker)
    finally:
        engine.dispose()


def _execute(context: JobContext, job_type: str, worker: str) -> str:
    heartbeat = Heartbeat(context, context.settings.heartbeat_interval_s)
    heartbeat.start()
    status, error, result = FAILED, None, None
    try:
        handler = HANDLERS.get(job_type)
        if handler is None:
            raise JobInputError(f"unknown job type {job_type!r}")
        result = handler(context)
        status = SUCCEEDED
    except Cancelled:
        status, error = CANCELLED, "cancelled by request"
    except JobInputError as exc:
        error, result = str(exc), {"error_code": exc.code}
    except Exception as exc:  # the job fails, the worker lives on
        error = f"internal error: {type(exc).__name__}: {exc}"
        context.log(traceback.format_exc())
        logger.exception("job %s failed", context.job_id)
    finally:
        heartbeat.stopped.set()
    finish(context.sessions, context.job_id, status, error=error, result=result,
           log_tail="\n".join(context.log_lines)[-20000:], only_worker=worker)
    return status


def _import_handlers() -> None:
    """Handlers register themselves on import; they pull in torch, so only workers import them."""
    import service.handlers  # noqa: F401

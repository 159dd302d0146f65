"""Where jobs run.

Both executors run each job through ``service.jobs.supervisor.supervise``, which starts a fresh,
sandboxed child process for it (never forked: CUDA does not survive a fork, and the API process
never imports torch):

- ``EmbeddedExecutor`` (default): a dispatcher thread inside ``mpq serve`` fills N slots.
- ``CeleryExecutor``: jobs go to a broker; a solo-pool ``mpq worker`` per GPU calls ``supervise``
  from its task (``service.jobs.celery_app``).

Both are an ``Executor``, all the app knows of them.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Protocol, TextIO, runtime_checkable

from service.job_status import JobStatus
from service.jobs.supervisor import supervise
from service.sandbox.child import process_alive
from service.settings import ExecutorKind, Settings
from service.store.sql_store import SqlStore
from service.store.tables import utcnow

logger = logging.getLogger("mpq.executor")


@runtime_checkable
class Executor(Protocol):
    """Where submitted jobs run. The job's row (queued) is the submission; ``submit`` only says there is
    one. The app starts the executor in the one process holding the ``ExecutorLock`` and stops it at
    shutdown, which requeues the jobs it was running."""

    def submit(self, job_id: str) -> None: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


def local_worker_is_dead(worker: str | None) -> bool:
    """A worker id is host:pid, or host:supervisor pid:job process pid (service.jobs.supervisor); the
    first pid is the process the job's fate depends on. On this host we can tell at once whether
    it still exists."""
    if not worker or ":" not in worker:
        return False
    host, _, pids = worker.partition(":")
    pid = pids.split(":")[0]
    return host == socket.gethostname() and pid.isdigit() and not process_alive(int(pid))


def worker_id() -> str:
    """This process's worker id (host:pid)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def reap(db: SqlStore, settings: Settings) -> list[tuple[str, JobStatus]]:
    """Requeue or fail running jobs whose worker is gone (a dead local pid, or a silent heartbeat).
    Returns (job id, new status) for each."""
    moved = []
    for job in db.running_jobs():
        if local_worker_is_dead(job.worker_id):
            moved.append((job.id, db.requeue_or_fail(job, "the worker process is gone", settings.max_attempts)))
    silent_since = utcnow() - timedelta(seconds=settings.heartbeat_timeout_s)
    reason = f"the worker stopped sending heartbeats for over {settings.heartbeat_timeout_s:.0f} s"
    for job in db.running_jobs(silent_since=silent_since):
        moved.append((job.id, db.requeue_or_fail(job, reason, settings.max_attempts)))
    return moved


class _BackgroundLoop:
    """A daemon thread running ``_loop`` until ``stop``; restartable (tests start and stop
    an app's lifespan more than once)."""

    thread_name = "mpq-loop"

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, daemon=True, name=self.thread_name)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        raise NotImplementedError


class EmbeddedExecutor(_BackgroundLoop, Executor):
    """Runs queued jobs in up to ``worker_slots`` child processes of this server."""

    thread_name = "mpq-dispatcher"

    def __init__(self, settings: Settings, db: SqlStore, poll_s: float = 0.5) -> None:
        super().__init__()
        self.settings = settings
        self.db = db
        self.poll_s = poll_s
        gpus = [g.strip() for g in (settings.gpus or "").split(",") if g.strip()]
        self._slots: dict[int, threading.Thread | None] = {i: None for i in range(settings.worker_slots)}
        self._slot_env = {i: ({"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]} if gpus else {}) for i in self._slots}
        self._wake = threading.Event()

    def submit(self, job_id: str) -> None:
        self._wake.set()  # the dispatcher reads the queue from the database

    def stop(self) -> None:
        self._wake.set()
        super().stop()
        for thread in self._slots.values():  # their supervisors see _stop, kill the job, requeue it
            if thread is not None:
                thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                reap(self.db, self.settings)
                self._dispatch()
            except Exception:  # keep dispatching through transient database errors
                logger.exception("dispatcher iteration failed")
            self._wake.wait(self.poll_s)
            self._wake.clear()

    def _dispatch(self) -> None:
        free = [slot for slot, thread in self._slots.items() if thread is None or not thread.is_alive()]
        if not free:
            return
        queued = self.db.queued_job_ids(limit=len(free))
        for slot, job_id in zip(free, queued):
            thread = threading.Thread(target=self._run_slot, args=(job_id, slot), daemon=True, name=f"mpq-slot-{slot}")
            self._slots[slot] = thread
            thread.start()

    def _run_slot(self, job_id: str, slot: int) -> None:
        try:
            supervise(job_id, self.settings, self.db, self._slot_env[slot], shutdown=self._stop)
        except Exception:
            logger.exception("supervising job %s failed", job_id)
        finally:
            self._wake.set()  # a slot is free: look at the queue now


class CeleryExecutor(_BackgroundLoop, Executor):
    """Sends jobs to the broker; ``mpq worker`` processes run them. Also re-sends jobs the
    reaper requeued, and queued jobs whose message may have been lost (duplicates are
    harmless: claiming a job is atomic)."""

    thread_name = "mpq-reaper"

    def __init__(self, settings: Settings, db: SqlStore, poll_s: float = 2.0, resend_after_s: float = 60.0) -> None:
        # celery and its broker clients load only where MPQ_EXECUTOR=celery (not an import cycle: celery_app
        # imports the supervisor, never this module)
        from service.jobs.celery_app import make_celery

        super().__init__()
        self.settings = settings
        self.db = db
        self.celery = make_celery(settings)
        self.poll_s = poll_s
        self.resend_after_s = resend_after_s
        self._sent: dict[str, float] = {}

    def submit(self, job_id: str) -> None:
        try:
            self.celery.send_task("mpq.run_job", args=[job_id])
            self._sent[job_id] = time.monotonic()
        except Exception:  # broker down: the loop re-sends once it is back
            logger.exception("could not send job %s to the broker; will retry", job_id)

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                for job_id, status in reap(self.db, self.settings):
                    if status == JobStatus.QUEUED:
                        self.submit(job_id)
                self._resend_forgotten()
            except Exception:
                logger.exception("reaper iteration failed")

    def _resend_forgotten(self) -> None:
        now = time.monotonic()
        for job_id in self.db.queued_job_ids():
            if now - self._sent.get(job_id, 0.0) > self.resend_after_s:
                self.submit(job_id)


class ExecutorLock:
    """One dispatcher per deployment: with several API processes (``mpq serve --api-workers N``)
    only the process holding this lock runs the executor loop; the others only write job rows,
    which that loop reads from the database. An exclusive ``flock`` on a file in the artifact
    store, released by the kernel when its holder dies."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: TextIO | None = None

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = self.path.open("a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return False
        self._file = handle
        return True

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor drops the flock
            self._file = None


def make_executor(settings: Settings, db: SqlStore) -> Executor:
    if settings.executor is ExecutorKind.celery:
        return CeleryExecutor(settings, db)
    return EmbeddedExecutor(settings, db)

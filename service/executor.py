"""Where jobs run.

Both executors run each job in a **spawned** child process (never forked: CUDA does not
survive a fork, and the API process never imports torch) watched by ``supervise``:

- ``EmbeddedExecutor`` (default): a dispatcher thread inside ``mpq serve`` fills N slots.
- Celery (``mpq worker``): a solo-pool worker per GPU calls ``supervise`` from its task.

Cancellation is a flag in the job row: the job checks it between steps; if it has not
stopped after ``cancel_grace_s`` it gets SIGTERM, and SIGKILL after as long again.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service import jobs
from service.settings import Settings
from service.tables import Job

logger = logging.getLogger("mpq.executor")
_PR_SET_PDEATHSIG = 1


def _child_main(job_id: str, settings_data: dict[str, Any], env: dict[str, str]) -> None:
    _die_with_parent()
    os.environ.update(env)  # CUDA_VISIBLE_DEVICES must be set before torch is imported
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM -> KeyboardInterrupt -> no finish
    jobs.run_job(job_id, Settings(**settings_data))


def _die_with_parent() -> None:
    """Linux: the job dies with its supervisor, so no job runs unwatched after a crash."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def supervise(job_id: str, settings: Settings, sessions: sessionmaker[Session], env: dict[str, str] | None = None,
              poll_s: float = 0.2, shutdown: threading.Event | None = None) -> str:
    """Run one job in a spawned child and make sure it ends in a finished (or requeued) state.

    When ``shutdown`` is set the child is stopped at once and its job requeued without
    counting the attempt (the server is going away; the job did nothing wrong).
    """
    process = multiprocessing.get_context("spawn").Process(
        target=_child_main, args=(job_id, settings.model_dump(mode="json"), env or {}), name=f"mpq-job-{job_id}")
    process.start()
    child_worker = f"{socket.gethostname()}:{process.pid}"
    cancel_seen: float | None = None
    terminated: float | None = None
    last_check = 0.0
    while process.is_alive():
        process.join(poll_s)
        if shutdown is not None and shutdown.is_set():
            process.kill()
            process.join()
            return _settle_shutdown(sessions, job_id, child_worker)
        now = time.monotonic()
        if now - last_check < 1.0 or not process.is_alive():
            continue
        last_check = now
        if cancel_seen is None and _cancel_requested(sessions, job_id):
            cancel_seen = now
        if cancel_seen is not None and terminated is None and now - cancel_seen > settings.cancel_grace_s:
            logger.info("job %s ignored its cancel flag: SIGTERM", job_id)
            process.terminate()
            terminated = now
        elif terminated is not None and now - terminated > settings.cancel_grace_s:
            logger.info("job %s survived SIGTERM: SIGKILL", job_id)
            process.kill()
    return _settle(sessions, settings, job_id, child_worker, process.exitcode)


def _cancel_requested(sessions: sessionmaker[Session], job_id: str) -> bool:
    try:
        with sessions() as session:
            return bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))
    except Exception:  # the database is away for a moment: ask again next time
        return False


def _settle(sessions: sessionmaker[Session], settings: Settings, job_id: str, child_worker: str,
            exitcode: int | None) -> str:
    """If the child died without finishing its job, finish or requeue it here."""
    with sessions() as session:
        job = session.get(Job, job_id)
    if job is None or job.status != jobs.RUNNING or job.worker_id != child_worker:
        return job.status if job else "missing"
    if job.cancel_requested:
        jobs.finish(sessions, job_id, jobs.CANCELLED, error="cancelled by request (the job was stopped)",
                    only_worker=child_worker)
        return jobs.CANCELLED
    reason = f"the worker process died (exit code {exitcode})"
    return jobs.requeue_or_fail(sessions, job, reason, settings.max_attempts)


def _settle_shutdown(sessions: sessionmaker[Session], job_id: str, child_worker: str) -> str:
    with sessions() as session:
        job = session.get(Job, job_id)
    if job is not None and job.status == jobs.RUNNING and job.worker_id == child_worker:
        jobs.requeue_after_shutdown(sessions, job)
        return jobs.QUEUED
    return job.status if job else "missing"


def local_worker_is_dead(worker: str | None) -> bool:
    """A worker id names host:pid; on this host we can tell at once whether it still exists."""
    if not worker or ":" not in worker:
        return False
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def reap(sessions: sessionmaker[Session], settings: Settings) -> list[tuple[str, str]]:
    """Requeue or fail running jobs whose worker is gone (dead local pid, or silent heartbeat)."""
    with sessions() as session:
        running = session.scalars(select(Job).where(Job.status == jobs.RUNNING)).all()
    moved = []
    for job in running:
        if local_worker_is_dead(job.worker_id):
            status = jobs.requeue_or_fail(sessions, job, "the worker process is gone", settings.max_attempts)
            moved.append((job.id, status))
    return moved + jobs.reap_stale(sessions, settings)


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


class EmbeddedExecutor(_BackgroundLoop):
    """Runs queued jobs in up to ``worker_slots`` child processes of this server."""

    thread_name = "mpq-dispatcher"

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], poll_s: float = 0.5) -> None:
        super().__init__()
        self.settings = settings
        self.sessions = sessions
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
                reap(self.sessions, self.settings)
                self._dispatch()
            except Exception:  # keep dispatching through transient database errors
                logger.exception("dispatcher iteration failed")
            self._wake.wait(self.poll_s)
            self._wake.clear()

    def _dispatch(self) -> None:
        free = [slot for slot, thread in self._slots.items() if thread is None or not thread.is_alive()]
        if not free:
            return
        with self.sessions() as session:
            queued = session.scalars(select(Job.id).where(Job.status == jobs.QUEUED)
                                     .order_by(Job.created_at).limit(len(free))).all()
        for slot, job_id in zip(free, queued):
            thread = threading.Thread(target=self._run_slot, args=(job_id, slot), daemon=True,
                                      name=f"mpq-slot-{slot}")
            self._slots[slot] = thread
            thread.start()

    def _run_slot(self, job_id: str, slot: int) -> None:
        try:
            supervise(job_id, self.settings, self.sessions, self._slot_env[slot], shutdown=self._stop)
        except Exception:
            logger.exception("supervising job %s failed", job_id)
        finally:
            self._wake.set()  # a slot is free: look at the queue now


class CeleryExecutor(_BackgroundLoop):
    """Sends jobs to the broker; ``mpq worker`` processes run them. Also re-sends jobs the
    reaper requeued, and queued jobs whose message may have been lost (duplicates are
    harmless: claiming a job is atomic)."""

    thread_name = "mpq-reaper"

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], poll_s: float = 2.0,
                 resend_after_s: float = 60.0) -> None:
        from service.celery_app import make_celery

        super().__init__()
        self.settings = settings
        self.sessions = sessions
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
                for job_id, status in reap(self.sessions, self.settings):
                    if status == jobs.QUEUED:
                        self.submit(job_id)
                self._resend_forgotten()
            except Exception:
                logger.exception("reaper iteration failed")

    def _resend_forgotten(self) -> None:
        now = time.monotonic()
        with self.sessions() as session:
            queued = session.scalars(select(Job.id).where(Job.status == jobs.QUEUED)).all()
        for job_id in queued:
            if now - self._sent.get(job_id, 0.0) > self.resend_after_s:
                self.submit(job_id)


class ExecutorLock:
    """One dispatcher per deployment: with several API processes (``mpq serve --api-workers N``)
    only the process holding this lock runs the executor loop; the others only write job rows,
    which that loop reads from the database. An exclusive ``flock`` on a file in the artifact
    store, released by the kernel when its holder dies."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = None

    def acquire(self) -> bool:
        import fcntl

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


def make_executor(settings: Settings, sessions: sessionmaker[Session]):
    from service.settings import ExecutorKind

    if settings.executor is ExecutorKind.celery:
        return CeleryExecutor(settings, sessions)
    return EmbeddedExecutor(settings, sessions)

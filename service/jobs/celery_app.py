"""The Celery side of the distributed executor: one task, ``mpq.run_job``.

Workers use the solo pool (one job at a time, one process per GPU) with late acks and a
prefetch of one, so a job a dead worker held is redelivered rather than lost, and the
broker's visibility timeout is longer than the longest job so it is not redelivered while
it still runs.

A worker told to stop (SIGTERM, Ctrl-C) stops its running job and puts it back in the queue, as
``mpq serve`` does: Celery's own warm shutdown waited for the job to finish (a job may take hours;
SIGTERM left a 30 s job running to its end).
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
from typing import Any

from celery import Celery
from celery.signals import worker_shutting_down

from service.job_status import JobStatus
from service.jobs.supervisor import supervise
from service.settings import Settings
from service.store.db import make_engine, session_factory
from service.store.sql_store import SqlStore

QUEUE = "mpq-jobs"
logger = logging.getLogger("mpq.worker")


def make_celery(settings: Settings, gpu: str | None = None, shutdown: threading.Event | None = None) -> Celery:
    """The Celery app; a worker's ``shutdown`` event, once set, stops its running job (requeued)."""
    app = Celery("mpq", broker=settings.broker_url)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=QUEUE,
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": int(settings.job_time_limit_s) + 600},
        worker_hijack_root_logger=False,
    )

    def run_job(job_id: str) -> str:
        engine = make_engine(settings.resolved_database_url)
        try:
            env = {"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {}
            status = supervise(job_id, settings, SqlStore(session_factory(engine)), env, shutdown=shutdown)
        finally:
            engine.dispose()
        if status == JobStatus.QUEUED and shutdown is not None and shutdown.is_set():
            _send_again(app, job_id)
        return status

    app.task(name="mpq.run_job")(run_job)  # registered by a call: celery is untyped, a decorator would untype it
    return app


def _send_again(app: Celery, job_id: str) -> None:
    """The job this worker stopped goes back to the broker at once, for another worker (the API also
    re-sends queued jobs, but only once their last message is a minute old)."""
    try:
        app.send_task("mpq.run_job", args=[job_id])
    except Exception:
        logger.exception("could not send job %s back to the broker; the API will re-send it", job_id)


def run_worker(settings: Settings, gpu: str | None, name: str | None) -> int | None:
    """Run a worker until it is stopped; returns the signal that stopped it (SIGTERM, SIGINT), if any."""
    shutdown = threading.Event()
    stopped_by: list[int] = []

    def on_shutdown(sig: str = "SIGTERM", **_: Any) -> None:  # in the signal handler, in the main process
        stopped_by.append(getattr(signal, sig, signal.SIGTERM))
        shutdown.set()

    worker_shutting_down.connect(on_shutdown, weak=False)
    app = make_celery(settings, gpu, shutdown)
    node = name or f"mpq-{socket.gethostname()}-{gpu if gpu is not None else 'cpu'}"
    try:
        _start(app, node)
    finally:
        worker_shutting_down.disconnect(on_shutdown)
    return stopped_by[0] if stopped_by else None


def _start(app: Celery, node: str) -> None:
    try:
        app.worker_main(
            [
                "worker",
                "--pool=solo",
                "--concurrency=1",
                "--loglevel=INFO",
                f"--queues={QUEUE}",
                f"--hostname={node}@%h",
                "--without-gossip",
                "--without-mingle",
            ]
        )
    except SystemExit as exit_:  # Celery's command line ends with sys.exit, 0 after a stop by signal
        if exit_.code not in (0, None):
            raise

"""The Celery side of the distributed executor: one task, ``mpq.run_job``.

Workers use the solo pool (one job at a time, one process per GPU) with late acks and a
prefetch of one, so a job a dead worker held is redelivered rather than lost, and the
broker's visibility timeout is longer than the longest job so it is not redelivered while
it still runs.
"""

from __future__ import annotations

import socket

from celery import Celery

from service.jobs.supervisor import supervise
from service.settings import Settings
from service.store.db import make_engine, session_factory
from service.store.sql_store import SqlStore

QUEUE = "mpq-jobs"


def make_celery(settings: Settings, gpu: str | None = None) -> Celery:
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
            return supervise(job_id, settings, SqlStore(session_factory(engine)), env)
        finally:
            engine.dispose()

    app.task(name="mpq.run_job")(run_job)  # registered by a call: celery is untyped, a decorator would untype it
    return app


def run_worker(settings: Settings, gpu: str | None, name: str | None) -> None:
    app = make_celery(settings, gpu)
    node = name or f"mpq-{socket.gethostname()}-{gpu if gpu is not None else 'cpu'}"
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

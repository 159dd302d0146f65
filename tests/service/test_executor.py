"""The two executors are ``Executor``s: what the app calls on them is all they share."""

from __future__ import annotations

import pytest

from service.jobs.executor import CeleryExecutor, EmbeddedExecutor, Executor, make_executor
from service.settings import ExecutorKind, Settings
from service.store.db import make_engine, session_factory
from service.store.sql_store import SqlStore


@pytest.mark.parametrize("kind", [ExecutorKind.embedded, ExecutorKind.celery])
def test_make_executor_gives_an_executor_of_the_configured_kind(kind, tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'mpq.db'}")
    settings = Settings(data_dir=tmp_path, executor=kind)  # nothing starts: no broker is reached
    executor = make_executor(settings, SqlStore(session_factory(engine)))
    assert isinstance(executor, Executor)
    assert type(executor) is {ExecutorKind.embedded: EmbeddedExecutor, ExecutorKind.celery: CeleryExecutor}[kind]
    engine.dispose()

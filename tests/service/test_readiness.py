"""/readyz fails (503, naming the check) when the database no longer takes writes or the store is full."""

from __future__ import annotations

import os

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, make_url, text

from service.app import create_app
from service.settings import Settings
from service.store.db import make_engine, session_factory, upgrade
from service.store.sql_store import SqlStore
from tests.service.helpers import ADMIN_URL, assert_problem


def own_app(url: str, tmp_path) -> TestClient:
    """An app of the test's own on ``url`` (no lifespan: no executor polls the database)."""
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    settings = Settings(database_url=url, artifact_dir=tmp_path / "store", allowed_hosts="testserver", worker_slots=0)
    return TestClient(create_app(settings), raise_server_exceptions=False)


def test_ready_reports_each_check(client):
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok", "store": "ok"}


def test_a_full_store_is_not_ready(client, app):
    free = os.statvfs(app.state.settings.resolved_artifact_dir)
    settings = app.state.settings
    app.state.settings = settings.model_copy(update={"min_free_bytes": free.f_bavail * free.f_frsize + 2**30})
    response = client.get("/readyz")
    assert_problem(response, 503, "store full", "MPQ_MIN_FREE_BYTES")
    assert response.json()["checks"]["database"] == "ok"
    app.state.settings = settings.model_copy(update={"min_free_bytes": 0})
    assert client.get("/readyz").status_code == 200


def test_a_read_only_sqlite_database_is_not_ready(tmp_path):
    path = tmp_path / "mpq.db"
    client = own_app(f"sqlite:///{path}", tmp_path)
    assert client.get("/readyz").status_code == 200
    # The same file opened read-only, as on a read-only mount. (chmod 0444 would not stop root, which runs
    # the tests here.) Reads still work: only a write tells.
    read_only = create_engine(f"sqlite:///file:{path}?mode=ro&uri=true")
    client.app.state.db = SqlStore(session_factory(read_only))
    with read_only.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM readiness")).scalar() == 1
    response = client.get("/readyz")
    assert_problem(response, 503, "database not writable")
    assert response.json()["checks"] == {"database": "not writable: OperationalError", "store": "ok"}
    read_only.dispose()
    client.app.state.engine.dispose()


@pytest.mark.slow
def test_a_read_only_postgresql_database_is_not_ready(own_postgres_url, tmp_path):
    client = own_app(own_postgres_url, tmp_path)
    assert client.get("/readyz").status_code == 200
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:  # what a fail-over to a standby or a full disk's emergency mode does
        connection.execute(
            text(f'ALTER DATABASE "{make_url(own_postgres_url).database}" SET default_transaction_read_only = on')
        )
    admin.dispose()
    client.app.state.engine.dispose()  # new connections pick the setting up
    assert_problem(client.get("/readyz"), 503, "database not writable")
    client.app.state.engine.dispose()

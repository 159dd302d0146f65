"""Service fixtures: every test using ``client`` runs on SQLite and on PostgreSQL.

PostgreSQL is the real server on 127.0.0.1:5432 (override with MPQ_TEST_POSTGRES_ADMIN_URL);
each test run creates a fresh database and drops it at the end.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from service.app import create_app
from service.settings import AuthMode, Settings
from service.store.db import make_engine, upgrade
from service.store.tables import Base
from tests.models import npz_bytes, trained_digits_onnx
from tests.service.helpers import ADMIN_URL

BACKENDS = ["sqlite", "postgresql"]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-quic",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
]


@contextmanager
def fresh_postgres_database() -> Iterator[str]:
    name = f"mpq_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """The database of the session's in-process PostgreSQL app (its executor polls it)."""
    with fresh_postgres_database() as url:
        yield url


@pytest.fixture
def own_postgres_url() -> Iterator[str]:
    """A database of this test's own, for servers and workers started as separate processes
    (the session app's executor must not take their jobs)."""
    with fresh_postgres_database() as url:
        yield url


@pytest.fixture(scope="session")
def database_urls(tmp_path_factory, request) -> dict[str, str]:
    """Lazily: the PostgreSQL database is only created when a test asks for it."""
    sqlite_path = tmp_path_factory.mktemp("sqlite") / "mpq.db"
    return {"sqlite": f"sqlite:///{sqlite_path}"}


def _url(backend: str, database_urls: dict[str, str], request) -> str:
    if backend == "postgresql":
        return request.getfixturevalue("postgres_url")
    return database_urls[backend]


@pytest.fixture(scope="session", params=BACKENDS)
def backend_settings(request, database_urls, tmp_path_factory) -> Settings:
    url = _url(request.param, database_urls, request)
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    # TestClient sends Host: testserver; the live server's clients send 127.0.0.1, allowed by default.
    return Settings(
        database_url=url,
        artifact_dir=tmp_path_factory.mktemp(f"store-{request.param}"),
        allowed_hosts="testserver",
        max_upload_bytes=16 * 1024 * 1024,
        auth=AuthMode.off,
        worker_slots=1,
        heartbeat_interval_s=0.5,
        heartbeat_timeout_s=15,
        cancel_grace_s=1.0,
        max_attempts=2,
    )


@pytest.fixture(scope="session")
def app_for_backend(backend_settings):
    app = create_app(backend_settings)
    with TestClient(app):
        yield app


@pytest.fixture
def app(app_for_backend):
    """The session's app, emptied after each test, with its settings restored."""
    original = app_for_backend.state.settings
    yield app_for_backend
    app_for_backend.state.settings = original
    with app_for_backend.state.sessions() as session, session.begin():
        for table in reversed(Base.metadata.sorted_tables):
            session.execute(table.delete())
    root: Path = app_for_backend.state.store.root
    for path in sorted(root.rglob("*"), reverse=True):
        if path.is_file():
            path.unlink()


@pytest.fixture
def client(app) -> TestClient:
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture
def live_server(app) -> Iterator[str]:
    """The app served by a real uvicorn server on a free loopback port."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def digits_files():
    """The trained digits CNN (tests/models.py) as upload bodies: model, calibration and evaluation sets."""
    proto, _, data = trained_digits_onnx()
    calib = npz_bytes(input=data.train_x[:256], labels=data.train_y[:256])
    evaluation = npz_bytes(input=data.test_x, labels=data.test_y)
    return proto.SerializeToString(), calib, evaluation, data


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium driven by Playwright (never `playwright install`: no browser downloads). Skipped
    only where /usr/bin/chromium is missing and CI is not set; in CI the browser tests must run."""
    if not CHROMIUM.exists() and not os.environ.get("CI"):
        pytest.skip("browser tests need Debian's chromium at /usr/bin/chromium (bash scripts/setup.sh --dev)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield instance
        instance.close()

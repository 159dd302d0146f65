"""The mpq command line, run as a real process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest

from tests.service.helpers import stop_process

pytestmark = pytest.mark.slow  # each test starts mpq processes (seconds of imports each)


def run_mpq(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=timeout,
    )


def test_serve_help_documents_settings(tmp_path):
    result = run_mpq("serve", "--help", env={})
    assert result.returncode == 0
    for name in ("MPQ_DATABASE_URL", "MPQ_ARTIFACT_DIR", "MPQ_MAX_UPLOAD_BYTES", "MPQ_AUTH", "MPQ_HOST", "MPQ_PORT"):
        assert name in result.stdout


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _older_schema(data_dir) -> None:
    """The database a previous mpq version left: migrated to 0006, one revision short of head."""
    from service.store.db import make_engine, upgrade

    engine = make_engine(f"sqlite:///{data_dir / 'mpq.db'}")
    upgrade(engine, "0006")
    engine.dispose()


def test_serve_refuses_an_out_of_date_schema_and_upgrades_it_when_asked(tmp_path):
    _older_schema(tmp_path)
    result = run_mpq("serve", env={"MPQ_DATA_DIR": str(tmp_path)})
    assert result.returncode == 2
    assert "at revision 0006" in result.stderr and "mpq db upgrade" in result.stderr
    assert run_mpq("token", "create", "--name", "ci", env={"MPQ_DATA_DIR": str(tmp_path)}).returncode == 2
    assert run_mpq("db", "upgrade", env={"MPQ_DATA_DIR": str(tmp_path)}).returncode == 0
    assert run_mpq("token", "create", "--name", "ci", env={"MPQ_DATA_DIR": str(tmp_path)}).returncode == 0


def _serve_until_announced(data_dir, *args: str) -> list[str]:
    """Start `mpq serve`, read its stderr up to the "serving on" line, check the port answers at
    once (no retry), stop it; the lines read."""
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--port", str(port), *args],
        env={**os.environ, "MPQ_DATA_DIR": str(data_dir)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert server.stderr is not None
    try:
        lines = []
        for line in server.stderr:
            lines.append(line)
            if line.startswith("mpq: serving on"):
                break
        assert lines and lines[-1].startswith("mpq: serving on"), lines
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
        return lines
    finally:
        stop_process(server)


def test_first_serve_on_a_new_data_directory_creates_the_database_and_announces_only_once_listening(tmp_path):
    """As MLflow's server: no `mpq db upgrade` first. The "serving on" line comes once the port
    accepts connections: a client that connects as soon as it reads the line is served."""
    lines = _serve_until_announced(tmp_path / "new")
    assert any("created the database schema at revision" in line for line in lines), lines
    created = run_mpq("token", "create", "--name", "ci", env={"MPQ_DATA_DIR": str(tmp_path / "new")})
    assert created.returncode == 0 and "created the database" not in created.stderr  # made once


def test_serve_upgrade_db_upgrades_an_older_schema(tmp_path):
    _older_schema(tmp_path)
    lines = _serve_until_announced(tmp_path, "--upgrade-db")
    assert any("upgraded the database schema from revision 0006 to" in line for line in lines), lines


def test_token_create_on_a_new_data_directory_creates_the_database(tmp_path):
    created = run_mpq("token", "create", "--name", "ci", env={"MPQ_DATA_DIR": str(tmp_path / "fresh")})
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["token"] and "created the database schema" in created.stderr


def test_serve_refuses_a_public_bind_without_auth(tmp_path):
    result = run_mpq("serve", "--host", "0.0.0.0", env={"MPQ_DATA_DIR": str(tmp_path)})
    assert result.returncode == 2
    assert "MPQ_AUTH=token" in result.stderr


def test_token_created_by_the_cli_opens_the_api(tmp_path):
    import socket

    env = {"MPQ_DATA_DIR": str(tmp_path), "MPQ_AUTH": "token"}
    created = run_mpq("token", "create", "--name", "ci", env=env)
    assert created.returncode == 0, created.stderr
    token = json.loads(created.stdout)["token"]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                import time

                time.sleep(0.05)
        assert httpx.get(f"{url}/v1/models").status_code == 401
        response = httpx.get(f"{url}/v1/models", headers={"authorization": f"Bearer {token}"})
        assert response.status_code == 200 and response.json()["total"] == 0
        listed = run_mpq("token", "list", env=env)
        assert "ci" in listed.stdout and "active" in listed.stdout
    finally:
        stop_process(server)

"""The mpq command line, run as a real process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx


def run_mpq(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "service.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=timeout)


def test_serve_help_documents_settings(tmp_path):
    result = run_mpq("serve", "--help", env={})
    assert result.returncode == 0
    for name in ("MPQ_DATABASE_URL", "MPQ_ARTIFACT_DIR", "MPQ_MAX_UPLOAD_BYTES", "MPQ_AUTH", "MPQ_HOST", "MPQ_PORT"):
        assert name in result.stdout


def test_serve_refuses_an_out_of_date_schema(tmp_path):
    result = run_mpq("serve", env={"MPQ_DATA_DIR": str(tmp_path)})
    assert result.returncode == 2
    assert "mpq db upgrade" in result.stderr


def test_serve_refuses_a_public_bind_without_auth(tmp_path):
    result = run_mpq("serve", "--host", "0.0.0.0", env={"MPQ_DATA_DIR": str(tmp_path)})
    assert result.returncode == 2
    assert "MPQ_AUTH=token" in result.stderr


def test_token_created_by_the_cli_opens_the_api(tmp_path):
    import socket

    env = {"MPQ_DATA_DIR": str(tmp_path), "MPQ_AUTH": "token"}
    assert run_mpq("db", "upgrade", env=env).returncode == 0
    created = run_mpq("token", "create", "--name", "ci", env=env)
    assert created.returncode == 0, created.stderr
    token = json.loads(created.stdout)["token"]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
                              env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
        server.terminate()
        server.wait(timeout=10)

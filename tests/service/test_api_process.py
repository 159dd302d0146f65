"""The API process never imports torch, onnxruntime or the libraries (docs/design.md: uploads are parsed,
never executed in the API process; docs/security.md: the API process never imports torch). Inspections
and jobs run in child processes; what comes back from them is JSON. A stray import in a route, a schema
or the code that stores a job's result would load torch into the server that holds the database
credentials (and seconds of imports into its start).

Each test builds the app as ``mpq serve`` does (service.cli imported, the schema prepared,
``create_app(Settings())`` from MPQ_* settings), in a fresh interpreter, drives it in-process with
starlette's TestClient (no socket), and prints which of the modules were loaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.models import npz_bytes, tiny_onnx_model

REPO = Path(__file__).resolve().parents[2]
NEVER_IN_THE_API = ("torch", "onnxruntime", "sensitivity", "planner")

pytestmark = pytest.mark.slow  # a fresh interpreter with the service's imports (seconds); run by the whole suite

_SERVE = """
import json, sys, time
from pathlib import Path

from fastapi.testclient import TestClient

from service.cli import commands  # noqa: F401 - what `mpq serve` has imported before it builds the app
from service.app import create_app
from service.store.db import make_engine, prepare_schema
from service.settings import Settings

inputs, modules = Path(sys.argv[1]), sys.argv[2].split(",")
settings = Settings()
engine = make_engine(settings.resolved_database_url)
prepare_schema(engine)
engine.dispose()
seen = {}
with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
    octets = {"content-type": "application/octet-stream"}
    statuses = [client.get(path).status_code for path in ("/healthz", "/readyz", "/v1/models", "/v1/jobs", "/")]
    if (inputs / "model.onnx").exists():
        model = client.post("/v1/models", content=(inputs / "model.onnx").read_bytes(), headers=octets).json()
        data = client.post("/v1/datasets", content=(inputs / "data.npz").read_bytes(), headers=octets).json()
        body = {"model_id": model["id"], "dataset_id": data["id"], "method": "hawq_v2", "options": {"max_probes": 8}}
        job = client.post("/v1/sensitivity", json=body).json()
        deadline = time.monotonic() + 240
        while job["status"] not in ("succeeded", "failed", "cancelled") and time.monotonic() < deadline:
            time.sleep(0.1)
            job = client.get(f"/v1/jobs/{job['id']}").json()
        statuses += [job["status"], client.get(f"/v1/jobs/{job['id']}").status_code, client.get("/").status_code]
print(json.dumps({"statuses": statuses, "loaded": [name for name in modules if name in sys.modules]}))
"""


def _serve_and_report(tmp_path: Path) -> dict:
    environment = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "MPQ_DATA_DIR": str(tmp_path / "data"),
        "MPQ_WORKER_SLOTS": "1",
        "OMP_NUM_THREADS": "1",
    }
    for name in ("MPQ_DATABASE_URL", "MPQ_ARTIFACT_DIR", "MPQ_EXECUTOR", "MPQ_AUTH"):
        environment.pop(name, None)
    finished = subprocess.run(
        [sys.executable, "-c", _SERVE, str(tmp_path), ",".join(NEVER_IN_THE_API)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=environment,
        timeout=300,
    )
    assert finished.returncode == 0, finished.stderr
    return json.loads(finished.stdout.strip().splitlines()[-1])


def test_the_api_starts_and_answers_without_torch(tmp_path) -> None:
    report = _serve_and_report(tmp_path)
    assert report["statuses"] == [200, 200, 200, 200, 200]
    assert report["loaded"] == [], f"the API process imported {report['loaded']}"


def test_uploads_and_a_finished_job_leave_the_api_without_torch(tmp_path) -> None:
    """Uploads go through the inspector processes and the job through its sandboxed child; the API
    process only stores what they report."""
    (tmp_path / "model.onnx").write_bytes(tiny_onnx_model().SerializeToString())
    rng = np.random.default_rng(0)
    (tmp_path / "data.npz").write_bytes(npz_bytes(x=rng.standard_normal((16, 8)).astype(np.float32)))
    report = _serve_and_report(tmp_path)
    assert report["statuses"] == [200, 200, 200, 200, 200, "succeeded", 200, 200]
    assert report["loaded"] == [], f"the API process imported {report['loaded']}"

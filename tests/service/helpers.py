"""Helpers of the service tests (plain code; the fixtures are in ``conftest.py``): requests and their
answers on the in-process app (``upload``, ``assert_problem``, ``wait_for``...), the same on a real
server over HTTP (``http_upload``, ``http_job``...), and the ``mpq`` command line.
"""

from __future__ import annotations

import argparse
import functools
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest
from sqlalchemy import func, select

from service.settings import AuthMode
from service.store.tables import Base
from tests.models import mlp_onnx_model, npz_bytes

# ---------------------------------------------------------------- the app under test


ADMIN_URL = os.environ.get("MPQ_TEST_POSTGRES_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


# For tests of logic no database takes part in (request validation, upload inspection, the sandbox):
# one backend suffices, and each of these tests starts processes that take seconds of CPU.
sqlite_only = pytest.mark.parametrize("backend_settings", ["sqlite"], indirect=True)


def enable_auth(app) -> None:
    app.state.settings = app.state.settings.model_copy(update={"auth": AuthMode.token})


def snapshot(app) -> dict[str, int]:
    """Row counts of every table and files in the store: 'nothing new' is an equal snapshot."""
    counts: dict[str, int] = {}
    with app.state.sessions() as session:
        for table in Base.metadata.sorted_tables:
            counts[table.name] = session.scalar(select(func.count()).select_from(table))
    counts["blobs"] = app.state.store.blob_count()
    counts["temp_files"] = app.state.store.temp_count()
    return counts


# ---------------------------------------------------------------- requests to the in-process app


PROBLEM = "application/problem+json"


def upload(client, path: str, body, name: str | None = None, **headers):
    params = {"name": name} if name else {}
    return client.post(
        path, content=body, params=params, headers={"content-type": "application/octet-stream", **headers}
    )


def assert_problem(response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    body = response.json()
    assert body["status"] == status and body["title"] and body["detail"]
    assert "Traceback" not in response.text
    for word in words:
        assert word.lower() in body["detail"].lower(), body["detail"]


def wait_for(client, job_id: str, statuses=("succeeded", "failed", "cancelled"), timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} still {job['status']} after {timeout} s: {job}")


def uploaded(client, model_bytes: bytes, dataset_bytes: bytes) -> tuple[str, str]:
    model = upload(client, "/v1/models", model_bytes)
    dataset = upload(client, "/v1/datasets", dataset_bytes)
    assert model.status_code == dataset.status_code == 201, (model.text, dataset.text)
    return model.json()["id"], dataset.json()["id"]


def slow_inputs(client, width: int = 1024) -> tuple[str, str]:
    """A model and data whose Hutchinson probes take ~50 ms each (2-core CPU): MAX_PROBES of them, minutes."""
    rng = np.random.default_rng(0)
    data = npz_bytes(x=rng.standard_normal((256, 256)).astype(np.float32), labels=rng.integers(0, 10, 256))
    return uploaded(client, mlp_onnx_model(width=width).SerializeToString(), data)


def post_json_text(client, path: str, text: str):
    """POST a JSON body written by hand: the API reads bodies with Python's json, which accepts
    Infinity, NaN, 1e400 (= inf) and ints of any size, none of which json.dumps writes from a dict."""
    return client.post(path, content=text, headers={"content-type": "application/json"})


# ---------------------------------------------------------------- a real server over HTTP


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stop_process(process: subprocess.Popen, timeout: float = 30.0) -> None:
    """End a process the test started, failing or not: SIGTERM (its graceful stop), then SIGKILL if it
    has not ended within ``timeout``; waited for either way, so that none of it runs on after the test
    (tests/conftest.py fails a module that leaves a process running)."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def wait_until(condition, timeout: float, message: str) -> None:
    """Poll ``condition`` until it holds; a transport error (the server not up yet) counts as not yet."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(message)


def http_upload(client: httpx.Client, path: str, body: bytes) -> str:
    """Upload ``body`` to a real server; the new row's id."""
    response = client.post(path, content=body, headers={"content-type": "application/octet-stream"})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def http_job(client: httpx.Client, job_id: str, statuses=("succeeded", "failed", "cancelled"), timeout=180.0) -> dict:
    """The job once a real server shows it in one of ``statuses``."""
    box: dict = {}

    def done() -> bool:
        box["job"] = client.get(f"/v1/jobs/{job_id}").json()
        return box["job"]["status"] in statuses

    wait_until(done, timeout, f"job {job_id} did not reach {statuses}: {box.get('job')}")
    return box["job"]


def exchange(connection: socket.socket, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send one HTTP/1.1 request on a kept-alive connection and read its whole response."""
    connection.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        received = connection.recv(65536)
        if not received:
            raise ConnectionError(f"the server closed the connection; got {data[:200]!r}")
        data += received
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    while len(body) < int(headers.get("content-length", 0)):
        received = connection.recv(65536)
        if not received:
            raise ConnectionError("the server closed the connection mid-body")
        body += received
    return int(status_line.split()[1]), headers, body


# ---------------------------------------------------------------- the mpq command line


# Builds the mpq parser with the local commands, as service/cli/commands.py will once it registers them.
_RUNNER = """
import argparse, sys
from service.cli.local_commands import register
parser = argparse.ArgumentParser(prog="mpq")
register(parser.add_subparsers())
args = parser.parse_args(sys.argv[1:])
sys.exit(args.handler(args, None))
"""


def _registered_in_cli() -> bool:
    from service.cli import commands as cli

    commands = next(a for a in cli._parser()._actions if isinstance(a, argparse._SubParsersAction))
    return "plan" in commands.choices and "sensitivity" in commands.choices


def run_mpq(*args: str, cwd) -> subprocess.CompletedProcess[str]:
    """A real ``mpq`` process (each costs seconds of imports, so only one per exit status)."""
    command = ["-m", "service.cli"] if _registered_in_cli() else ["-c", _RUNNER]
    environment = {**os.environ, "MPQ_DATA_DIR": str(cwd), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, *command, *args], capture_output=True, text=True, cwd=cwd, env=environment, timeout=120
    )


def call_mpq(*args: str, capsys) -> tuple[int, str, str]:
    """The same command line in this process: (exit status, stdout, stderr)."""
    if _registered_in_cli():
        from service.cli import main

        status = main(list(args))
    else:
        from service.cli.local_commands import register

        parser = argparse.ArgumentParser(prog="mpq")
        register(parser.add_subparsers())
        parsed = parser.parse_args(list(args))
        status = parsed.handler(parsed, None)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# ---------------------------------------------------------------- torch.export archives planned end to end


@dataclass(frozen=True)
class Pt2Case:
    """A trained network as a ``.pt2`` upload, its calibration and evaluation sets, and a plan body's
    search and constraints for it; ``batch``: the samples per run of its artifact (a fixed batch)."""

    name: str
    model: bytes
    calibration: bytes
    evaluation: bytes
    input_name: str
    eval_x: np.ndarray
    eval_y: np.ndarray
    batch: int | None
    search: str
    constraints: dict[str, Any]
    layers: frozenset[str]


@functools.cache
def pt2_cases() -> tuple[Pt2Case, Pt2Case]:
    """The digits CNN (BatchNorm after each conv) with a dynamic batch, planned by pareto under a third
    of its float size, and the token transformer with a fixed batch of 4, planned by bisection within a
    1.5 pp drop (cached: one training and export per session)."""
    import tempfile
    from pathlib import Path

    import torch

    from sensitivity.zoo import trained_tiny_transformer
    from tests.models import trained_digits_module
    from tests.pt2_archives import save_exported

    digits_model, digits = trained_digits_module()
    transformer, task = trained_tiny_transformer()
    with tempfile.TemporaryDirectory() as folder:
        cnn = save_exported(digits_model, (torch.from_numpy(digits.train_x[:4]),), Path(folder) / "c.pt2", dynamic=True)
        tokens = save_exported(
            transformer, (torch.from_numpy(task.train_x[:4]),), Path(folder) / "t.pt2", dynamic=False
        )
        cnn_bytes, tokens_bytes = cnn.read_bytes(), tokens.read_bytes()
    block = {f"block.{name}.weight" for name in ("query", "key", "value", "proj", "fc1", "fc2")}
    return (
        Pt2Case(
            "cnn",
            cnn_bytes,
            npz_bytes(x=digits.train_x[:256], labels=digits.train_y[:256]),
            npz_bytes(x=digits.test_x, labels=digits.test_y),
            "x",
            digits.test_x,
            digits.test_y,
            None,
            "pareto",
            {"max_size_bytes": 30_000},
            frozenset({"conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"}),
        ),
        Pt2Case(
            "transformer",
            tokens_bytes,
            npz_bytes(ids=task.train_x[:256], labels=task.train_y[:256]),
            npz_bytes(ids=task.test_x[:512], labels=task.test_y[:512]),
            "ids",
            task.test_x[:512],
            task.test_y[:512],
            4,
            "bisection",
            {"max_drop": 1.5},
            frozenset({"embedding.weight", "head.weight", *block}),
        ),
    )


def pt2_plan_body(case: Pt2Case, model_id: str, calibration_id: str, evaluation_id: str) -> dict[str, Any]:
    return {
        "model_id": model_id,
        "calibration_dataset_id": calibration_id,
        "evaluation_dataset_id": evaluation_id,
        "method": "hawq_v2",
        "search": case.search,
        "candidates": ["fp32", "w8a8", "w4a8", "w8", "w4"],
        "constraints": case.constraints,
        "options": {"trace_max_probes": 32, "batch_size": 128},
    }


def artifact_accuracy(case: Pt2Case, artifact: bytes) -> float:
    """Top-1 accuracy (percent) of a plan's artifact on the case's evaluation set, in onnxruntime."""
    import onnxruntime as ort

    session = ort.InferenceSession(artifact, providers=["CPUExecutionProvider"])
    step = case.batch or len(case.eval_x)
    logits = np.concatenate(
        [session.run(None, {case.input_name: case.eval_x[i : i + step]})[0] for i in range(0, len(case.eval_x), step)]
    )
    return 100.0 * float((logits.argmax(1) == case.eval_y).mean())

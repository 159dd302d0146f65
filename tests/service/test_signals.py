"""Stopping mpq (service/cli/signals.py): SIGTERM and Ctrl-C end a command the way an error does, with
one line and exit status 143 or 130, a server's running job back in the queue; every process below a
server ends with it, even when it is killed with SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from sqlalchemy import create_engine, text

from service.cli.signals import reported_stops
from tests import processes
from tests.models import mlp_onnx_model, npz_bytes
from tests.service.helpers import free_port, http_job, http_upload, wait_until

# 60 probes of a 384-wide MLP: a job that runs for tens of seconds on 2 cores, long enough to be stopped
LONG_JOB = {"tolerance": 1e-9, "min_probes": 60, "max_probes": 60}
MPQ = [sys.executable, "-m", "service.cli"]


# ---------------------------------------------------------------- in this process


@pytest.fixture
def harmless_sigterm() -> Iterator[object]:
    """A SIGTERM handler that does nothing, in place while the test runs: should the code under test
    fail to catch the signal, the test fails instead of pytest being terminated."""
    handler = signal.signal(signal.SIGTERM, _ignore)
    try:
        yield _ignore
    finally:
        signal.signal(signal.SIGTERM, handler)


def _ignore(signum: int, frame: object) -> None:
    pass


def test_sigterm_runs_the_commands_cleanup_and_ends_it_with_143_in_one_line(harmless_sigterm, capsys):
    cleaned_up = []

    @reported_stops
    def command(argv: list[str] | None) -> int:
        try:
            signal.raise_signal(signal.SIGTERM)
            time.sleep(30)  # the signal's handler raises before this sleep ends
        finally:
            cleaned_up.append(True)
        return 0

    assert command(["sensitivity", "--json"]) == 143
    assert cleaned_up == [True]
    out, err = capsys.readouterr()
    assert err == "mpq: terminated (SIGTERM)\n"
    assert json.loads(out) == {
        "error": "terminated (SIGTERM)",
        "exit_code": 143,
        "problem": "terminated",
        "job_id": None,
    }
    assert signal.getsignal(signal.SIGTERM) is harmless_sigterm  # the handler before the command is back


def test_ctrl_c_ends_a_command_with_130_in_one_line(capsys):
    @reported_stops
    def command(argv: list[str] | None) -> int:
        raise KeyboardInterrupt

    assert command(["plan"]) == 130
    out, err = capsys.readouterr()
    assert (out, err) == ("", "mpq: interrupted (SIGINT)\n")


# ---------------------------------------------------------------- real mpq processes


@contextmanager
def serving(data_dir: Path, *args: str) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    """``mpq serve ARGS`` in a session of its own (a terminal's Ctrl-C reaches its process group), until
    it answers /readyz; killed with its group afterwards if a test left it running. Yields the process,
    its URL and the file holding its stderr."""
    port = free_port()
    log = data_dir.parent / f"serve-{port}.log"
    env = {**os.environ, "MPQ_DATA_DIR": str(data_dir), "MPQ_HEARTBEAT_INTERVAL_S": "0.5"}
    with log.open("w") as stderr:  # the server writes through its own copy of the descriptor
        server = subprocess.Popen(
            [*MPQ, "serve", "--port", str(port), *args],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(f"{url}/readyz").status_code == 200, 60, "the server did not start")
        yield server, url, log
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)


def _inputs(directory: Path) -> tuple[Path, Path]:
    model, data = directory / "mlp.onnx", directory / "data.npz"
    model.write_bytes(mlp_onnx_model(width=384).SerializeToString())
    data.write_bytes(npz_bytes(x=np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)))
    return model, data


def _start_long_job(url: str, model: Path, data: Path) -> str:
    with httpx.Client(base_url=url, timeout=60) as client:
        body = {
            "model_id": http_upload(client, "/v1/models", model.read_bytes()),
            "dataset_id": http_upload(client, "/v1/datasets", data.read_bytes()),
            "method": "hawq_v2",
            "options": LONG_JOB,
        }
        job_id = client.post("/v1/sensitivity", json=body).json()["id"]
        http_job(client, job_id, statuses=("running",), timeout=120)
    return job_id


def _job_row(data_dir: Path, job_id: str) -> tuple[str, int]:
    """(status, attempts) of a job, read from the database of a server that has stopped."""
    engine = create_engine(f"sqlite:///{data_dir / 'mpq.db'}")
    try:
        with engine.connect() as connection:
            row = connection.execute(text("SELECT status, attempts FROM jobs WHERE id = :id"), {"id": job_id}).one()
    finally:
        engine.dispose()
    return row[0], row[1]


def _commands(found: list) -> list[str]:
    return [" ".join(process.cmdline()) for process in found]


@pytest.mark.slow
def test_sigterm_stops_serve_its_api_processes_and_everything_below_and_requeues_the_running_job(tmp_path):
    data_dir = tmp_path / "data"
    model, data = _inputs(tmp_path)
    with serving(data_dir, "--api-workers", "2") as (server, url, log):
        job_id = _start_long_job(url, model, data)
        below = processes.descendants(server.pid)
        commands = _commands(below)
        assert sum("--multiprocessing-fork" in command for command in commands) == 2, commands  # API processes
        assert any("multiprocessing.resource_tracker" in command for command in commands), commands
        assert any("service.jobs.job_process" in command for command in commands), commands
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=120) == 143
        left = processes.wait_gone(below, 30)
        assert not left, processes.describe(left)
    said = log.read_text()
    assert "mpq: terminated (SIGTERM)" in said and "Traceback" not in said, said[-3000:]
    assert _job_row(data_dir, job_id) == ("queued", 0)  # back in the queue; the attempt does not count


@pytest.mark.slow
def test_sigkill_of_serve_takes_its_api_processes_the_resource_tracker_and_the_inspectors_along(tmp_path):
    """Killed with SIGKILL, ``mpq serve --api-workers 2`` left both API processes serving, the
    multiprocessing resource tracker and every inspector under them: they now die with their parent."""
    with serving(tmp_path / "data", "--api-workers", "2") as (server, _url, _log):
        below: list = []

        def everything_started() -> bool:
            below[:] = processes.descendants(server.pid)
            inspectors = [p for p in below if "service.inspection.checks" in p.cmdline()]
            return len({inspector.ppid() for inspector in inspectors}) == 2  # spares under both API processes

        wait_until(everything_started, 60, "the API processes started no inspectors")
        assert any("multiprocessing.resource_tracker" in command for command in _commands(below))
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=10)
        left = processes.wait_gone(below, 30)
        assert not left, processes.describe(left)


@pytest.mark.slow
def test_ctrl_c_stops_the_remote_cli_and_then_serve_each_in_one_line(tmp_path):
    """Ctrl-C reaches a terminal's whole process group. The remote CLI stops waiting and says the job
    goes on on the server; the server then stops, stops the job's process and requeues the job."""
    data_dir = tmp_path / "data"
    model, data = _inputs(tmp_path)
    with serving(data_dir) as (server, url, log):
        command = [*MPQ, "sensitivity", str(model), "--data", str(data), "--server", url, "--json"]
        with (tmp_path / "cli.out").open("w") as out, (tmp_path / "cli.err").open("w") as err:
            cli = subprocess.Popen(
                [*command, "--method", "hawq_v2", "--max-probes", "60", "--tol", "1e-9"],
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        try:
            with httpx.Client(base_url=url, timeout=60) as client:
                wait_until(lambda: client.get("/v1/jobs").json()["total"] == 1, 120, "the CLI submitted no job")
                job_id = client.get("/v1/jobs").json()["items"][0]["id"]
                http_job(client, job_id, statuses=("running",), timeout=120)
                os.killpg(cli.pid, signal.SIGINT)
                assert cli.wait(timeout=60) == 130
                assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "running"  # only the client stopped
        finally:
            if cli.poll() is None:
                cli.kill()
                cli.wait(timeout=10)
        said = (tmp_path / "cli.err").read_text()
        assert said.rstrip().endswith("mpq: interrupted (SIGINT)"), said[-3000:]
        assert "stopped waiting; the job goes on on the server" in said and job_id in said
        assert "Traceback" not in said and "KeyboardInterrupt" not in said
        assert json.loads((tmp_path / "cli.out").read_text())["exit_code"] == 130

        below = processes.descendants(server.pid)
        assert any("service.jobs.job_process" in command for command in _commands(below))
        os.killpg(server.pid, signal.SIGINT)
        assert server.wait(timeout=120) == 130
        left = processes.wait_gone(below, 30)
        assert not left, processes.describe(left)
    said = log.read_text()
    assert "mpq: interrupted (SIGINT)" in said, said[-3000:]
    assert "Traceback" not in said and "KeyboardInterrupt" not in said, said[-3000:]
    assert _job_row(data_dir, job_id) == ("queued", 0)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "status", "line"),
    [(signal.SIGINT, 130, "mpq: interrupted (SIGINT)"), (signal.SIGTERM, 143, "mpq: terminated (SIGTERM)")],
    ids=["SIGINT", "SIGTERM"],
)
def test_a_local_command_stopped_mid_run_says_so_in_one_line(tmp_path, signum, status, line):
    """Ctrl-C printed a KeyboardInterrupt traceback; SIGTERM ended the command on the spot, silently."""
    model, data = _inputs(tmp_path)
    out, err = tmp_path / "out", tmp_path / "err"
    with out.open("w") as stdout, err.open("w") as stderr:
        command = subprocess.Popen(
            [
                *MPQ,
                "sensitivity",
                str(model),
                "--data",
                str(data),
                "--method",
                "hawq_v2",
                "--max-probes",
                "200",
                "--tol",
                "1e-9",
                "--json",
            ],
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
        )
    try:
        wait_until(lambda: "traces" in err.read_text(), 120, "the command did not start its traces")
        os.killpg(command.pid, signum)
        assert command.wait(timeout=60) == status
    finally:
        if command.poll() is None:
            command.kill()
            command.wait(timeout=10)
    said = err.read_text()
    assert said.rstrip().endswith(line), said[-3000:]
    assert "Traceback" not in said and "KeyboardInterrupt" not in said
    assert json.loads(out.read_text())["exit_code"] == status

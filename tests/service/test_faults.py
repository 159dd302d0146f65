"""Faults: the API restarts mid-job, the database drops every connection mid-job."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from sqlalchemy import create_engine, text

from tests.models import mlp_onnx_model, npz_bytes, tiny_onnx_model
from tests.service.helpers import (
    ADMIN_URL,
    free_port,
    http_job,
    http_upload,
    slow_inputs,
    stop_process,
    wait_for,
    wait_until,
)

LONG_JOB = {"tolerance": 1e-9, "min_probes": 60, "max_probes": 60}


def _serve(env: dict[str, str], port: int, log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("a") as log:  # the server writes through its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


@pytest.mark.slow
def test_api_restart_mid_job_requeues_and_finishes(own_postgres_url, tmp_path):
    env = {
        **os.environ,
        "MPQ_DATABASE_URL": own_postgres_url,
        "MPQ_ARTIFACT_DIR": str(tmp_path / "store"),
        "MPQ_HEARTBEAT_INTERVAL_S": "0.5",
        "MPQ_HEARTBEAT_TIMEOUT_S": "10",
    }
    subprocess.run([sys.executable, "-m", "service.cli", "db", "upgrade"], env=env, check=True, capture_output=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "api.log"
    api = _serve(env, port, log)
    try:
        wait_until(lambda: httpx.get(f"{url}/readyz").status_code == 200, 60, "API did not start")
        rng = np.random.default_rng(0)
        with httpx.Client(base_url=url, timeout=60) as client:
            model = http_upload(client, "/v1/models", mlp_onnx_model(width=384).SerializeToString())
            data = http_upload(client, "/v1/datasets", npz_bytes(x=rng.standard_normal((256, 256)).astype(np.float32)))
            job_id = client.post(
                "/v1/sensitivity",
                json={"model_id": model, "dataset_id": data, "method": "hawq_v2", "options": LONG_JOB},
            ).json()["id"]
            running = http_job(client, job_id, statuses=("running",), timeout=60)
        api.send_signal(signal.SIGKILL)
        api.wait(timeout=10)
        job_pid = int(running["worker_id"].rsplit(":", 1)[1])
        wait_until(lambda: not _alive(job_pid), 10, "the job process outlived its server")
        api = _serve(env, port, log)
        wait_until(lambda: httpx.get(f"{url}/readyz").status_code == 200, 60, "API did not restart")
        with httpx.Client(base_url=url, timeout=60) as client:
            final = http_job(client, job_id, timeout=240)
        assert final["status"] == "succeeded", final
        assert final["attempts"] == 2
    finally:
        stop_process(api)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_lost_database_connections_are_retried(client, app, backend_settings):
    if not backend_settings.resolved_database_url.startswith("postgresql"):
        pytest.skip("dropping server connections is a PostgreSQL scenario")
    database = backend_settings.resolved_database_url.rsplit("/", 1)[1]
    model_id, dataset_id = slow_inputs(client, width=384)
    job_id = client.post(
        "/v1/sensitivity",
        json={"model_id": model_id, "dataset_id": dataset_id, "method": "hawq_v2", "options": LONG_JOB},
    ).json()["id"]
    wait_for(client, job_id, statuses=("running",), timeout=60)

    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    stop = threading.Event()
    dropped = []

    def drop_connections() -> None:
        while not stop.wait(0.3):
            with admin.connect() as connection:
                dropped.append(
                    connection.execute(
                        text(
                            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                            "WHERE datname = :db AND pid <> pg_backend_pid()"
                        ),
                        {"db": database},
                    ).scalar()
                )

    killer = threading.Thread(target=drop_connections)
    killer.start()
    time.sleep(3)
    stop.set()
    killer.join()
    admin.dispose()
    assert sum(dropped) > 0, "no connection was dropped: the test did not test anything"
    final = wait_for(client, job_id, timeout=240)
    assert final["status"] == "succeeded", (final["error"], final["attempts"], final["log_tail"])
    assert client.get("/v1/jobs").status_code == 200


def test_executor_lock_is_exclusive(tmp_path):
    from service.jobs.executor import ExecutorLock

    first, second = ExecutorLock(tmp_path / "x.lock"), ExecutorLock(tmp_path / "x.lock")
    assert first.acquire() and not second.acquire()
    first.release()
    assert second.acquire()
    second.release()


@pytest.mark.slow
def test_several_api_processes_share_one_executor(tmp_path):
    """`mpq serve --api-workers 2`: jobs submitted to either process run (once each)."""
    env = {**os.environ, "MPQ_DATA_DIR": str(tmp_path), "MPQ_HEARTBEAT_INTERVAL_S": "0.5", "MPQ_WORKER_SLOTS": "1"}
    subprocess.run([sys.executable, "-m", "service.cli", "db", "upgrade"], env=env, check=True, capture_output=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with (tmp_path / "api.log").open("w") as log:  # the server writes through its own copy of the descriptor
        server = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--api-workers", "2"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    try:
        wait_until(lambda: httpx.get(f"{url}/readyz").status_code == 200, 60, "API did not start")
        rng = np.random.default_rng(0)
        with httpx.Client(base_url=url, timeout=60) as client:
            model = http_upload(client, "/v1/models", tiny_onnx_model().SerializeToString())
            data = http_upload(client, "/v1/datasets", npz_bytes(x=rng.standard_normal((16, 8)).astype(np.float32)))
            jobs = [
                client.post(
                    "/v1/sensitivity",
                    json={"model_id": model, "dataset_id": data, "method": "hawq_v2", "options": {"seed": seed}},
                ).json()["id"]
                for seed in range(3)
            ]
            finished = [http_job(client, job_id, timeout=180) for job_id in jobs]
        assert [job["status"] for job in finished] == ["succeeded"] * 3, finished
        assert all(job["attempts"] == 1 for job in finished)
        # one executor with one slot: the jobs ran one after another, never two at once
        from datetime import datetime

        spans = sorted(
            (datetime.fromisoformat(job["started_at"]), datetime.fromisoformat(job["finished_at"])) for job in finished
        )
        assert all(earlier[1] <= later[0] for earlier, later in itertools.pairwise(spans)), spans
    finally:
        stop_process(server)


def test_a_job_whose_process_has_exited_is_alive_while_its_supervisor_stores_it():
    """The reaper watched the job's process, which exits before its supervisor has stored the
    result: finished jobs were requeued and ran twice (two latency rows for one job)."""
    import socket

    from service.jobs.executor import local_worker_is_dead

    exited = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    gone = int(exited.stdout)
    host = socket.gethostname()
    assert not local_worker_is_dead(f"{host}:{os.getpid()}:{gone}")  # the supervisor (this process) lives
    assert local_worker_is_dead(f"{host}:{gone}:{os.getpid()}")  # its supervisor is gone
    assert local_worker_is_dead(f"{host}:{gone}") and not local_worker_is_dead(f"elsewhere:{gone}")


@pytest.mark.slow
def test_the_remote_cli_waits_out_a_server_restart_and_a_rerun_attaches_to_the_job(own_postgres_url, tmp_path):
    """The server is killed while ``mpq sensitivity --server`` waits on its job and comes back 3 s
    later: the client retries (it exited 1 within 3 s before), the job is requeued and finishes, and
    the command succeeds. Run again, the same command attaches to that job instead of starting one."""
    env = {
        **os.environ,
        "MPQ_DATABASE_URL": own_postgres_url,
        "MPQ_ARTIFACT_DIR": str(tmp_path / "store"),
        "MPQ_HEARTBEAT_INTERVAL_S": "0.5",
        "MPQ_HEARTBEAT_TIMEOUT_S": "10",
    }
    subprocess.run([sys.executable, "-m", "service.cli", "db", "upgrade"], env=env, check=True, capture_output=True)
    model, data = tmp_path / "mlp.onnx", tmp_path / "data.npz"
    model.write_bytes(mlp_onnx_model(width=384).SerializeToString())
    data.write_bytes(npz_bytes(x=np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "service.cli", "sensitivity", str(model), "--data", str(data), "--json"]
    command += ["--server", url, "--method", "hawq_v2", "--max-probes", "60", "--tol", "1e-9"]
    log = tmp_path / "api.log"
    api = _serve(env, port, log)
    cli = None
    try:
        wait_until(lambda: httpx.get(f"{url}/readyz").status_code == 200, 60, "API did not start")
        cli = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        with httpx.Client(base_url=url, timeout=60) as client:
            wait_until(lambda: client.get("/v1/jobs").json()["total"] == 1, 120, "the CLI submitted no job")
            job_id = client.get("/v1/jobs").json()["items"][0]["id"]
            http_job(client, job_id, statuses=("running",), timeout=60)
        api.send_signal(signal.SIGKILL)
        api.wait(timeout=10)
        time.sleep(3)
        api = _serve(env, port, log)
        out, err = cli.communicate(timeout=300)
        assert cli.returncode == 0, err[-3000:]
        assert "retrying in" in err  # it said what it was doing while the server was away
        assert json.loads(out)["method"] == "hawq_v2"
        again = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr[-3000:]
        assert f"job {job_id} on" in again.stderr  # the same job: nothing ran twice
        with httpx.Client(base_url=url, timeout=60) as client:
            assert client.get("/v1/jobs").json()["total"] == 1
    finally:
        if cli is not None:  # on a failure it would go on waiting out the outage for minutes
            stop_process(cli)
        stop_process(api)

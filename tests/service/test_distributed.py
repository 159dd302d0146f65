"""The distributed topology on loopback: PostgreSQL, a Redis broker, `mpq serve` with the
Celery executor and two `mpq worker` processes, all real processes started here."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import httpx
import numpy as np
import onnxruntime as ort
import psutil
import pytest
import redis

from tests.models import mlp_onnx_model, npz_bytes, tiny_onnx_model
from tests.service.helpers import (
    artifact_accuracy,
    free_port,
    http_job,
    http_upload,
    pt2_cases,
    pt2_plan_body,
    wait_until,
)

pytestmark = pytest.mark.slow  # a cluster of processes

BROKER_DB = 13


@pytest.fixture
def cluster(own_postgres_url, tmp_path) -> Iterator[tuple[str, list[subprocess.Popen]]]:
    broker = f"redis://127.0.0.1:6379/{BROKER_DB}"
    redis.Redis.from_url(broker).flushdb()
    env = {
        **os.environ,
        "MPQ_DATABASE_URL": own_postgres_url,
        "MPQ_ARTIFACT_DIR": str(tmp_path / "store"),
        "MPQ_EXECUTOR": "celery",
        "MPQ_BROKER_URL": broker,
        "MPQ_HEARTBEAT_INTERVAL_S": "0.5",
        "MPQ_HEARTBEAT_TIMEOUT_S": "5",
        "MPQ_CANCEL_GRACE_S": "1",
    }
    mpq = [sys.executable, "-m", "service.cli"]
    subprocess.run([*mpq, "db", "upgrade"], env=env, check=True, capture_output=True)
    port = free_port()
    logs = tmp_path / "logs"
    logs.mkdir()
    processes = []
    for name, command in [("api", ["serve", "--port", str(port)])] + [
        (f"worker{index}", ["worker", "--name", f"w{index}"]) for index in range(2)
    ]:
        with (logs / f"{name}.log").open("w") as log:  # each process writes through its own descriptor
            processes.append(
                subprocess.Popen(
                    [*mpq, *command], env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT
                )
            )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(f"{url}/readyz").status_code == 200, 60, "the API did not start")
        yield url, processes
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


def test_two_workers_share_the_queue_and_survive_a_kill(cluster):
    url, processes = cluster
    rng = np.random.default_rng(0)
    with httpx.Client(base_url=url, timeout=60) as client:
        tiny = http_upload(client, "/v1/models", tiny_onnx_model().SerializeToString())
        tiny_data = http_upload(client, "/v1/datasets", npz_bytes(x=rng.standard_normal((16, 8)).astype(np.float32)))
        jobs = [
            client.post(
                "/v1/sensitivity",
                json={"model_id": tiny, "dataset_id": tiny_data, "method": "hawq_v2", "options": {"seed": seed}},
            ).json()["id"]
            for seed in range(2)
        ]
        finished = [http_job(client, job_id) for job_id in jobs]
        assert [job["status"] for job in finished] == ["succeeded"] * 2, finished

        # a plan end to end on the Celery executor: plan, wait, download, run the artifact
        labelled = http_upload(
            client,
            "/v1/datasets",
            npz_bytes(x=rng.standard_normal((32, 8)).astype(np.float32), labels=rng.integers(0, 3, 32)),
        )
        plan_job = client.post(
            "/v1/plans",
            json={
                "model_id": tiny,
                "calibration_dataset_id": labelled,
                "candidates": ["fp32", "w8a8", "w4"],
                "constraints": {"max_size_bytes": 10**6},
                "method": "hawq_v2",
                "options": {"trace_max_probes": 16},
            },
        ).json()["id"]
        done = http_job(client, plan_job)
        assert done["status"] == "succeeded", done
        plan = client.get(f"/v1/plans/{done['result']['plan_id']}").json()
        artifact = client.get(f"/v1/plans/{plan['id']}/artifact").content
        assert hashlib.sha256(artifact).hexdigest() == plan["artifact"]["sha256"]
        outputs = ort.InferenceSession(artifact, providers=["CPUExecutionProvider"]).run(
            None, {"x": np.zeros((4, 8), np.float32)}
        )[0]
        assert outputs.shape == (4, 3)

        # kill -9 the worker (and with it its job process) in the middle of a job
        long_job, running, _job_pid, supervisor = _long_job_running(client, processes, rng)
        os.killpg(supervisor.pid, signal.SIGKILL)
        final = http_job(client, long_job, timeout=240)
        assert final["status"] == "succeeded", final
        assert final["attempts"] == 2 and final["worker_id"] != running["worker_id"]


def _long_job_running(
    client: httpx.Client, processes: list[subprocess.Popen], rng: np.random.Generator
) -> tuple[str, dict, int, subprocess.Popen]:
    """A sensitivity job of minutes, once running: its id, its record, its process id and the worker
    process (of ``processes``) it runs under."""
    mlp = http_upload(client, "/v1/models", mlp_onnx_model(width=384).SerializeToString())
    mlp_data = http_upload(client, "/v1/datasets", npz_bytes(x=rng.standard_normal((256, 256)).astype(np.float32)))
    long_job = client.post(
        "/v1/sensitivity",
        json={
            "model_id": mlp,
            "dataset_id": mlp_data,
            "method": "hawq_v2",
            "options": {"tolerance": 1e-9, "min_probes": 60, "max_probes": 60},
        },
    ).json()["id"]
    running = http_job(client, long_job, statuses=("running",), timeout=60)
    job_pid = int(running["worker_id"].rsplit(":", 1)[1])
    return long_job, running, job_pid, next(p for p in processes[1:] if job_pid in _children(p.pid))


def _children(pid: int) -> set[int]:
    try:
        return {child.pid for child in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def test_pt2_plans_run_on_celery_workers(cluster):
    """Both torch.export cases, submitted together to the two workers: the digits CNN (BatchNorm, dynamic
    batch) by pareto and the token transformer (fixed batch of 4) by bisection, each exported to ONNX in
    its worker; each artifact measures in onnxruntime what its plan reports."""
    url, _processes = cluster
    cases = pt2_cases()
    with httpx.Client(base_url=url, timeout=60) as client:
        submitted = {}
        for case in cases:
            model_id = http_upload(client, "/v1/models", case.model)
            calibration_id = http_upload(client, "/v1/datasets", case.calibration)
            evaluation_id = http_upload(client, "/v1/datasets", case.evaluation)
            response = client.post("/v1/plans", json=pt2_plan_body(case, model_id, calibration_id, evaluation_id))
            assert response.status_code == 202, response.text
            submitted[case.name] = response.json()["id"]
        for case in cases:
            job = http_job(client, submitted[case.name], timeout=300)
            assert job["status"] == "succeeded", (case.name, job["error"], job["log_tail"][-3000:])
            plan = client.get(f"/v1/plans/{job['result']['plan_id']}").json()
            assert plan["search"] == case.search
            assert set(plan["assignment"]) == case.layers and plan["predicted"]["meets_constraints"]
            artifact = client.get(f"/v1/plans/{job['result']['plan_id']}/artifact").content
            assert artifact_accuracy(case, artifact) == pytest.approx(plan["measured"]["metric"], abs=1e-6)


def test_a_worker_stopped_by_sigterm_requeues_its_job_for_the_other_worker(cluster):
    """Celery's warm shutdown waited for the running job to finish (hours, for a long one): the worker
    now stops the job's process, puts the job back in the queue (the attempt does not count) and
    sends it to the broker again, and ends with 143."""
    url, processes = cluster
    rng = np.random.default_rng(0)
    with httpx.Client(base_url=url, timeout=60) as client:
        long_job, running, job_pid, worker = _long_job_running(client, processes, rng)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 143
        wait_until(lambda: not psutil.pid_exists(job_pid), 10, "the job process outlived its worker")
        final = http_job(client, long_job, timeout=240)
        assert final["status"] == "succeeded", final
        assert final["attempts"] == 1 and final["worker_id"] != running["worker_id"]

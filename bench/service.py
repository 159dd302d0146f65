"""Service load: GET /v1/plans/{id} latency under 200 concurrent clients, and 50 concurrent
plan submissions that must all complete (no job lost).

Runs a real `mpq serve` (embedded executor) on loopback against a fresh data directory.

    .venv/bin/python bench/service.py [--clients 200] [--requests 100] [--submissions 50] [--slots 2]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository, not bench/, comes first

import argparse
import asyncio
import statistics
import subprocess
import tempfile
import time

import httpx
import numpy as np

from bench.server import running_server
from tests.models import npz_bytes, tiny_onnx_model


def upload(client: httpx.Client, route: str, body: bytes) -> str:
    response = client.post(route, content=body, headers={"content-type": "application/octet-stream"})
    response.raise_for_status()
    return response.json()["id"]


def plan_body(model_id: str, data_id: str, seed: int) -> dict:
    return {
        "model_id": model_id,
        "calibration_dataset_id": data_id,
        "method": "hawq_v2",
        "search": "pareto",
        "candidates": ["fp32", "w8a8"],
        "constraints": {"max_size_bytes": 10**6},
        "options": {"seed": seed, "trace_max_probes": 16},
    }


def wait_all(client: httpx.Client, job_ids: list[str], timeout_s: float) -> dict[str, int]:
    deadline = time.monotonic() + timeout_s
    pending = set(job_ids)
    statuses: dict[str, str] = {}
    while pending and time.monotonic() < deadline:
        for job_id in list(pending):
            status = client.get(f"/v1/jobs/{job_id}").json()["status"]
            if status in ("succeeded", "failed", "cancelled"):
                statuses[job_id] = status
                pending.discard(job_id)
        time.sleep(0.5)
    counts: dict[str, int] = {}
    for job_id in job_ids:
        key = statuses.get(job_id, "unfinished")
        counts[key] = counts.get(key, 0) + 1
    return counts


async def hammer(url: str, path: str, clients: int, requests_each: int) -> list[float]:
    """Latencies (ms) of ``clients`` keep-alive connections each sending ``requests_each`` GETs.

    A bare asyncio HTTP/1.1 client: httpx's pool is slow at 200 connections (about 330 req/s
    here), so with it the figures measured the client, not the server.
    """
    host, port = httpx.URL(url).host, httpx.URL(url).port
    latencies: list[float] = []
    request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()

    async def one_client() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            for _ in range(requests_each):
                started = time.perf_counter()
                writer.write(request)
                status, length = await _read_head(reader)
                await reader.readexactly(length)
                latencies.append((time.perf_counter() - started) * 1000)
                if status != 200:
                    raise RuntimeError(f"GET {path} answered {status}")
        finally:
            writer.close()

    await asyncio.gather(*(one_client() for _ in range(clients)))
    return latencies


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, int]:
    """(status, Content-Length) of one response head."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    fields = dict(line.split(": ", 1) for line in head[1:] if ": " in line)
    lengths = [value for name, value in fields.items() if name.lower() == "content-length"]
    return int(head[0].split()[1]), int(lengths[0])


async def submit_concurrently(url: str, bodies: list[dict]) -> list[str]:
    async with httpx.AsyncClient(base_url=url, timeout=900) as client:
        responses = await asyncio.gather(*(client.post("/v1/plans", json=b) for b in bodies))
    for response in responses:
        response.raise_for_status()
    return [r.json()["id"] for r in responses]


def wrk_latency(url: str, clients: int, seconds: int) -> str | None:
    """wrk (C) keeps client overhead off the shared cores; None when it is not installed."""
    import shutil

    if shutil.which("wrk") is None:
        return None
    result = subprocess.run(
        ["wrk", "-t2", f"-c{clients}", f"-d{seconds}s", "--latency", url], capture_output=True, text=True, check=True
    )
    lines = result.stdout.splitlines()
    wanted = [
        line.strip() for line in lines if line.strip().startswith(("50%", "90%", "99%", "Requests/sec", "Non-2xx"))
    ]
    return ", ".join(wanted)


def submit_and_wait(url: str, model_id: str, data_id: str, submissions: int, slots: int) -> None:
    bodies = [plan_body(model_id, data_id, seed) for seed in range(1, submissions + 1)]
    started = time.perf_counter()
    job_ids = asyncio.run(submit_concurrently(url, bodies))
    submitted = time.perf_counter() - started
    with httpx.Client(base_url=url, timeout=120) as client:
        counts = wait_all(client, job_ids, timeout_s=3600)
    total = time.perf_counter() - started
    print(
        f"{submissions} concurrent plan submissions accepted in {submitted:.1f} s; "
        f"all finished after {total:.0f} s with {slots} worker slots: {counts}"
    )
    print("no job lost" if counts.get("succeeded") == submissions else "JOBS LOST OR FAILED")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--requests", type=int, default=100, help="GETs per client")
    parser.add_argument("--submissions", type=int, default=50)
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--api-workers", type=int, default=1, help="API processes (mpq serve --api-workers)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    settings = {"MPQ_WORKER_SLOTS": str(args.slots)}
    with (
        tempfile.TemporaryDirectory() as root,
        running_server(Path(root), settings, ("--api-workers", str(args.api_workers))) as server,
    ):
        url = server.url
        with httpx.Client(base_url=url, timeout=120) as client:
            model_id = upload(client, "/v1/models", tiny_onnx_model().SerializeToString())
            data_id = upload(
                client,
                "/v1/datasets",
                npz_bytes(x=rng.standard_normal((64, 8)).astype(np.float32), labels=rng.integers(0, 3, 64)),
            )
            first = client.post("/v1/plans", json=plan_body(model_id, data_id, 0)).json()["id"]
            assert wait_all(client, [first], 300) == {"succeeded": 1}, "the first plan failed"
            plan_id = client.get(f"/v1/jobs/{first}").json()["result"]["plan_id"]

        summary = wrk_latency(f"{url}/v1/plans/{plan_id}", args.clients, 15)
        if summary:
            print(
                f"wrk, {args.clients} connections, 15 s, {args.api_workers} API process(es), "
                f"GET /v1/plans/{{id}}: {summary}"
            )
        started = time.perf_counter()
        latencies = asyncio.run(hammer(url, f"/v1/plans/{plan_id}", args.clients, args.requests))
        elapsed = time.perf_counter() - started
        print(
            f"asyncio client, GET /v1/plans/{{id}}: {len(latencies)} requests from {args.clients} concurrent clients "
            f"in {elapsed:.1f} s ({len(latencies) / elapsed:.0f} req/s)"
        )
        print(
            f"  p50 {percentile(latencies, 50):.1f} ms, p90 {percentile(latencies, 90):.1f} ms, "
            f"p99 {percentile(latencies, 99):.1f} ms, mean {statistics.mean(latencies):.1f} ms "
            f"(target p99 < 100 ms)"
        )

        if args.submissions:
            submit_and_wait(url, model_id, data_id, args.submissions, args.slots)


if __name__ == "__main__":
    main()

"""Upload a 1 GiB ONNX model to a real `mpq serve` and report the server's memory growth.

Target (issue 2): the API process's resident memory grows by less than 100 MB, because the
body is streamed to disk and parsed in a separate inspector process. The inspector's own peak
is printed too, for honesty: parsing a 1 GiB protobuf costs about that much memory there.

    .venv/bin/python bench/upload_memory.py [--size-mib 1024]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository, not bench/, comes first

import argparse
import tempfile
import time

import httpx
import psutil

from bench.abuse_payloads import MiB, write_big_model
from bench.server import PeakRss, running_server


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=1024)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        model_path = Path(root) / "big.onnx"
        write_big_model(model_path, args.size_mib * MiB)
        size = model_path.stat().st_size
        with running_server(Path(root)) as server:
            process = psutil.Process(server.process.pid)
            with httpx.Client(timeout=600) as client:  # warm up: the first upload starts the inspector
                client.post(f"{server.url}/v1/models", content=b"warm-up")
            baseline = process.memory_info().rss
            started = time.perf_counter()
            with (
                PeakRss(server.process.pid) as sampler,
                model_path.open("rb") as body,
                httpx.Client(timeout=600) as client,
            ):
                response = client.post(
                    f"{server.url}/v1/models?name=big",
                    content=body,
                    headers={"content-type": "application/octet-stream"},
                )
            elapsed = time.perf_counter() - started
    growth_mb = (sampler.peak_server - baseline) / 1e6
    print(f"upload size:                 {size / 2**30:.3f} GiB")
    print(f"status:                      {response.status_code} ({response.json().get('format', response.text[:80])})")
    print(f"time:                        {elapsed:.1f} s ({size / 2**20 / elapsed:.0f} MiB/s)")
    print(f"API process RSS before:      {baseline / 1e6:.1f} MB")
    print(f"API process RSS peak growth: {growth_mb:.1f} MB (target < 100 MB)")
    print(f"inspector process RSS peak:  {sampler.peak_children / 1e6:.1f} MB (separate process)")


if __name__ == "__main__":
    main()

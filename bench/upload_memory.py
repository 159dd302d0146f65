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
import numpy as np
import psutil
from onnx import TensorProto, helper

from bench.server import PeakRss, running_server


def write_big_model(path: Path, size_mib: int) -> None:
    side = int((size_mib * 1024 * 1024 / 4) ** 0.5)
    weight = helper.make_tensor("big.weight", TensorProto.FLOAT, [side, side],
                                np.zeros((side, side), np.float32).tobytes(), raw=True)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "big.weight"], ["y"])], "big",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, side])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, side])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path.write_bytes(model.SerializeToString())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=1024)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        model_path = Path(root) / "big.onnx"
        write_big_model(model_path, args.size_mib)
        size = model_path.stat().st_size
        with running_server(Path(root)) as server:
            process = psutil.Process(server.process.pid)
            with httpx.Client(timeout=600) as client:  # warm up: the first upload starts the inspector
                client.post(f"{server.url}/v1/models", content=b"warm-up")
            baseline = process.memory_info().rss
            started = time.perf_counter()
            with PeakRss(server.process.pid) as sampler, model_path.open("rb") as body, \
                    httpx.Client(timeout=600) as client:
                response = client.post(f"{server.url}/v1/models?name=big", content=body,
                                       headers={"content-type": "application/octet-stream"})
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

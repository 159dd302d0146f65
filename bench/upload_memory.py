"""Upload a 1 GiB ONNX model to a real `mpq serve` and report the server's memory growth.

Target (issue 2): the API process's resident memory grows by less than 100 MB, because the
body is streamed to disk and parsed in a separate inspector process. The inspector's own peak
is printed too, for honesty: parsing a 1 GiB protobuf costs about that much memory there.

    .venv/bin/python bench/upload_memory.py [--size-mib 1024]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
from onnx import TensorProto, helper


def write_big_model(path: Path, size_mib: int) -> None:
    side = int((size_mib * 1024 * 1024 / 4) ** 0.5)
    weight = helper.make_tensor("big.weight", TensorProto.FLOAT, [side, side],
                                np.zeros((side, side), np.float32).tobytes(), raw=True)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "big.weight"], ["y"])], "big",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, side])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, side])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path.write_bytes(model.SerializeToString())


class PeakSampler(threading.Thread):
    def __init__(self, process: psutil.Process) -> None:
        super().__init__(daemon=True)
        self.process = process
        self.peak_server = 0
        self.peak_children = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.peak_server = max(self.peak_server, self.process.memory_info().rss)
                children = sum(c.memory_info().rss for c in self.process.children(recursive=True))
                self.peak_children = max(self.peak_children, children)
            except psutil.Error:
                pass
            time.sleep(0.02)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=1024)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        model_path = Path(root) / "big.onnx"
        write_big_model(model_path, args.size_mib)
        size = model_path.stat().st_size
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        env = {**os.environ, "MPQ_DATA_DIR": str(Path(root) / "data")}
        subprocess.run([sys.executable, "-m", "service.cli", "db", "upgrade"], env=env, check=True,
                       capture_output=True)
        server = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port)], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_ready(url)
            process = psutil.Process(server.pid)
            with httpx.Client(timeout=600) as client:  # warm up: the first upload starts the inspector
                client.post(f"{url}/v1/models", content=b"warm-up")
            baseline = process.memory_info().rss
            sampler = PeakSampler(process)
            sampler.start()
            started = time.perf_counter()
            with model_path.open("rb") as body, httpx.Client(timeout=600) as client:
                response = client.post(f"{url}/v1/models?name=big", content=body,
                                       headers={"content-type": "application/octet-stream"})
            elapsed = time.perf_counter() - started
            sampler.stop.set()
            sampler.join()
        finally:
            server.terminate()
            server.wait(timeout=30)
    growth_mb = (sampler.peak_server - baseline) / 1e6
    print(f"upload size:                 {size / 2**30:.3f} GiB")
    print(f"status:                      {response.status_code} ({response.json().get('format', response.text[:80])})")
    print(f"time:                        {elapsed:.1f} s ({size / 2**20 / elapsed:.0f} MiB/s)")
    print(f"API process RSS before:      {baseline / 1e6:.1f} MB")
    print(f"API process RSS peak growth: {growth_mb:.1f} MB (target < 100 MB)")
    print(f"inspector process RSS peak:  {sampler.peak_children / 1e6:.1f} MB (separate process)")


def _wait_ready(url: str) -> None:
    for _ in range(600):
        try:
            if httpx.get(f"{url}/healthz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise RuntimeError("server did not start")


if __name__ == "__main__":
    main()

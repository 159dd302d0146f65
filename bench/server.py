"""A real `mpq serve` for the benchmarks, on 127.0.0.1, a free port and a data directory of the caller's,
and a sampler of its memory.

    with running_server(root, {"MPQ_WORKER_SLOTS": "2"}) as server, PeakRss(server.process.pid) as rss:
        httpx.get(f"{server.url}/healthz")
    print(rss.peak_server, rss.peak_child, rss.peak_children)

The server runs this repository's code (``python -m service.cli`` with the repository first on
PYTHONPATH), also in its sandboxed children, which start in a private directory and would
otherwise import whatever checkout the virtual environment's editable install names.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"  # the benchmarks never talk to any other address
MPQ = [sys.executable, "-m", "service.cli"]


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    env: dict[str, str]

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def server_env(root: Path, settings: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a server whose data lives under ``root``: MPQ_DATA_DIR, ``settings`` (MPQ_*
    variables) and a PYTHONPATH that puts this repository, and its migrations as ``mpq_migrations``
    (the name they are installed under), first."""
    shim = root / "pythonpath"
    shim.mkdir(parents=True, exist_ok=True)
    if not (shim / "mpq_migrations").exists():
        (shim / "mpq_migrations").symlink_to(REPO / "migrations")
    paths = [str(REPO), str(shim), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "MPQ_DATA_DIR": str(root / "data"), **(settings or {}), "PYTHONPATH": os.pathsep.join(paths)}


def start_server(
    root: Path,
    settings: Mapping[str, str] | None = None,
    args: tuple[str, ...] = (),
    ready_timeout_s: float = 60.0,
    upgrade: bool = True,
) -> Server:
    """``mpq db upgrade`` (unless ``upgrade`` is false: a copy of an upgraded data directory) then
    ``mpq serve --port P``; returns once /readyz answers 200. The log goes to ``root/server.log``."""
    env = server_env(root, settings)
    if upgrade:
        upgrade_database(env)
    port = free_port()
    with (root / "server.log").open("w") as log:
        process = subprocess.Popen(
            [*MPQ, "serve", "--host", HOST, "--port", str(port), *args],
            env=env,
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    server = Server(process, f"http://{HOST}:{port}", env)
    try:
        _wait_ready(server, ready_timeout_s)
    except BaseException:
        stop_server(server)
        raise
    return server


def upgrade_database(env: Mapping[str, str]) -> None:
    subprocess.run([*MPQ, "db", "upgrade"], env=env, check=True, capture_output=True, cwd=REPO)


def create_token(env: Mapping[str, str], name: str) -> str:
    """A new API token (``mpq token create``), for servers run with MPQ_AUTH=token."""
    result = subprocess.run(
        [*MPQ, "token", "create", "--name", name], env=env, check=True, capture_output=True, text=True, cwd=REPO
    )
    return json.loads(result.stdout)["token"]


def stop_server(server: Server, timeout_s: float = 30.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout_s``."""
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


@contextmanager
def running_server(
    root: Path, settings: Mapping[str, str] | None = None, args: tuple[str, ...] = ()
) -> Iterator[Server]:
    server = start_server(root, settings, args)
    try:
        yield server
    finally:
        stop_server(server)


def _wait_ready(server: Server, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"mpq serve exited with {server.process.returncode} before it was ready")
        try:
            if httpx.get(f"{server.url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"mpq serve was not ready after {timeout_s:.0f} s")


class PeakRss(threading.Thread):
    """Samples a process's RSS and its descendants' (inspectors, job processes) every ``interval_s``;
    freed memory goes back to the system, so only sampling sees a peak. Use as a context manager."""

    def __init__(self, pid: int, interval_s: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.interval_s = interval_s
        self.peak_server = 0  # bytes
        self.peak_child = 0  # the largest single descendant
        self.peak_children = 0  # all descendants together
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.sample()
            time.sleep(self.interval_s)

    def sample(self) -> None:
        try:
            self.peak_server = max(self.peak_server, self.process.memory_info().rss)
            children = self.process.children(recursive=True)
        except psutil.Error:
            return
        sizes = []
        for child in children:
            with suppress(psutil.Error):  # it exited between the listing and the reading
                sizes.append(child.memory_info().rss)
        self.peak_child = max(self.peak_child, *sizes, 0)
        self.peak_children = max(self.peak_children, sum(sizes))

    def __enter__(self) -> PeakRss:
        self.sample()
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._done.set()
        self.join()
        self.sample()

"""Slow clients: connections that do not finish their request headers are closed
(service/api/guard.HeaderTimeoutProtocol), and `mpq serve` raises its open-file limit."""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from service.api.guard import HeaderTimeoutProtocol
from tests.service.helpers import exchange, sqlite_only, stop_process

pytestmark = pytest.mark.slow  # each test waits out the server's timeouts

TIMEOUT_S = 0.5
# What is tested is the server's sockets, not the database: SQLite only.


class ShortHeaderTimeout(HeaderTimeoutProtocol):
    header_timeout_s = TIMEOUT_S


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def server(app) -> Iterator[tuple[str, int]]:
    """The app on a real uvicorn server with the protocol (as `mpq serve` runs it, timeout shortened)."""
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", lifespan="off", loop="asyncio", http=ShortHeaderTimeout
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield "127.0.0.1", port
    server.should_exit = True
    thread.join(timeout=10)


def closed_after(connection: socket.socket, limit_s: float) -> float | None:
    """Seconds until the server closed the connection (EOF), or None if it was still open after ``limit_s``."""
    started = time.monotonic()
    connection.settimeout(limit_s)
    try:
        while connection.recv(65536):
            pass
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return time.monotonic() - started


def healthz(host: str, port: int) -> bytes:
    return f"GET /healthz HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()


@sqlite_only
def test_half_sent_headers_are_cut_while_others_are_served(server):
    host, port = server
    half = socket.create_connection(server)
    silent = socket.create_connection(server)
    with half, silent, socket.create_connection(server) as normal:
        half.sendall(f"GET /healthz HTTP/1.1\r\nHost: {host}:{port}\r\nX-Slow: ".encode())
        assert exchange(normal, healthz(host, port))[0] == 200  # served while the other one dawdles
        waited = closed_after(half, 5 * TIMEOUT_S)
        assert waited is not None and waited > TIMEOUT_S / 2, waited
        assert closed_after(silent, 2 * TIMEOUT_S) is not None  # one that never sends a byte goes too
    with socket.create_connection(server) as fresh:  # (``normal`` has idled past the timeout by now)
        assert exchange(fresh, healthz(host, port))[0] == 200


@sqlite_only
def test_the_timer_runs_again_for_each_request_on_a_connection(server):
    host, port = server
    with socket.create_connection(server) as connection:
        assert exchange(connection, healthz(host, port))[0] == 200
        connection.sendall(f"GET /healthz HTTP/1.1\r\nHost: {host}:".encode())
        assert closed_after(connection, 5 * TIMEOUT_S) is not None


@sqlite_only
def test_slow_requests_with_complete_headers_are_not_cut(server):
    host, port = server
    with socket.create_connection(server) as connection:
        connection.sendall(
            f"POST /v1/sensitivity HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json"
            "\r\nContent-Length: 2\r\n\r\n".encode()
        )
        time.sleep(2 * TIMEOUT_S)  # the body is another timer's business
        status, _, body = exchange(connection, b"{}")
        assert status == 422 and b"model_id" in body


def test_mpq_serve_raises_its_open_file_limit_and_times_out_headers(tmp_path):
    env = {**os.environ, "MPQ_DATA_DIR": str(tmp_path), "MPQ_HEADER_TIMEOUT_S": "1", "MPQ_WORKER_SLOTS": "0"}
    subprocess.run([sys.executable, "-m", "service.cli", "db", "upgrade"], env=env, check=True, capture_output=True)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert hard > 256, "the hard limit leaves nothing to raise"
    port = free_port()
    # prlimit starts the server (same pid) with a soft limit of 256 open files
    server = subprocess.Popen(
        ["prlimit", "--nofile=256:", sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline and server.poll() is None, "mpq serve did not start"
                time.sleep(0.1)
        limits = Path(f"/proc/{server.pid}/limits").read_text().splitlines()
        open_files = next(line for line in limits if line.startswith("Max open files")).split()
        assert open_files[3] == open_files[4] == str(hard), open_files
        with socket.create_connection(("127.0.0.1", port)) as half:
            half.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            assert closed_after(half, 5.0) is not None
    finally:
        stop_process(server)

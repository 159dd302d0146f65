"""A sandboxed child for tests/service/test_sandbox.py: enters the sandbox, then answers requests
to try things a hostile child would (read a file, connect somewhere, allocate, read its environment)."""

from __future__ import annotations

import encodings.idna  # noqa: F401 - connect() needs it, and a switched user may not read the stdlib
import os
import resource
import socket
from typing import Any

from service.sandbox.child import enter_sandbox

ACTIONS = ("read", "read_fd", "connect", "allocate", "import", "raise_limit")


def _try(request: dict[str, Any], fds: list[int]) -> str:
    try:
        result = _attempt(request, fds)
    except (OSError, MemoryError, ValueError) as error:
        return f"refused: {type(error).__name__}"
    return f"ok: {result}"


def _attempt(request: dict[str, Any], fds: list[int]) -> object:
    action = request["action"]
    if action == "read":
        with open(request["path"], "rb") as file:
            return file.read(16).decode(errors="replace")
    if action == "read_fd":
        return os.pread(fds[0], 16, 0).decode(errors="replace")
    if action == "connect":
        return _connect(request["port"])
    if action == "allocate":
        return _allocate(request["bytes"])
    if action == "import":
        return __import__(request["module"]).__name__
    assert action == "raise_limit", action
    resource.setrlimit(resource.RLIMIT_DATA, (resource.RLIM_INFINITY,) * 2)
    return None


def _connect(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        return "connected"


def _allocate(size: int) -> int:
    return len(bytearray(size))


def main() -> None:
    channel, report = enter_sandbox()
    channel.send(
        {
            "report": report.describe(),
            "uid": os.getuid(),
            "environ": sorted(os.environ),
            "data_limit": resource.getrlimit(resource.RLIMIT_DATA)[0],
        }
    )
    while (received := channel.receive()) is not None:
        request, fds = received
        if request["action"] not in ACTIONS:
            return
        channel.send({"answer": _try(request, fds)})


if __name__ == "__main__":
    main()

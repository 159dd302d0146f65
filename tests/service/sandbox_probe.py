"""A sandboxed child for tests/service/test_sandbox.py: enters the sandbox, then answers requests
to try things a hostile child would (read a file, connect somewhere, allocate, read its environment)."""

from __future__ import annotations

import encodings.idna  # noqa: F401 - connect() needs it, and a switched user may not read the stdlib
import os
import resource
import socket

from service.sandbox.child import enter_sandbox


def _try(action) -> str:
    try:
        result = action()
    except (OSError, MemoryError, ValueError) as error:
        return f"refused: {type(error).__name__}"
    return f"ok: {result}"


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
        action = request["action"]
        if action == "read":
            answer = _try(lambda: open(request["path"], "rb").read(16).decode(errors="replace"))
        elif action == "read_fd":
            answer = _try(lambda: os.pread(fds[0], 16, 0).decode(errors="replace"))
        elif action == "connect":
            answer = _try(lambda: _connect(request["port"]))
        elif action == "allocate":
            answer = _try(lambda: _allocate(request["bytes"]))
        elif action == "import":
            answer = _try(lambda: __import__(request["module"]).__name__)
        elif action == "raise_limit":
            answer = _try(lambda: resource.setrlimit(resource.RLIMIT_DATA, (resource.RLIM_INFINITY,) * 2))
        else:
            return
        channel.send({"answer": answer})


if __name__ == "__main__":
    main()

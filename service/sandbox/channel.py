"""Length-prefixed JSON frames over a Unix stream socket, optionally carrying file descriptors.

The link between a supervisor and a sandboxed child (``service.sandbox.child``). The child may be
compromised by the hostile file it opened, so what it sends is parsed as bounded JSON and never
unpickled; file descriptors travel the other way, so a child reads the files it is given without
any path into the store.

A frame is a 4-byte big-endian payload length, a 1-byte count of descriptors (sent as ancillary
data with the header) and the UTF-8 JSON payload.
"""

from __future__ import annotations

import json
import math
import select
import socket
import struct
import time
from collections.abc import Sequence
from typing import Any

_HEADER = struct.Struct(">IB")
MAX_FDS = 8


class ChannelClosed(Exception):
    """The other end closed the socket (or sent something that is not a frame)."""


class Channel:
    def __init__(self, sock: socket.socket, max_frame_bytes: int, frame_timeout_s: float = 60.0) -> None:
        self.sock = sock
        self.max_frame_bytes = max_frame_bytes
        self.frame_timeout_s = frame_timeout_s  # how long a frame, once begun, may take to arrive in full

    @classmethod
    def pair(cls, max_frame_bytes: int) -> tuple[Channel, socket.socket]:
        """This end, and the other end's socket (to hand to a child process)."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        return cls(mine, max_frame_bytes), theirs

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
        payload = json.dumps(message, separators=(",", ":")).encode()
        if len(payload) > self.max_frame_bytes:
            raise ValueError(f"message of {len(payload)} bytes exceeds the channel's {self.max_frame_bytes}")
        header = _HEADER.pack(len(payload), len(fds))
        self.sock.settimeout(None)
        try:
            if fds:
                socket.send_fds(self.sock, [header], list(fds))
            else:
                self.sock.sendall(header)
            self.sock.sendall(payload)
        except (BrokenPipeError, ConnectionResetError) as error:
            raise ChannelClosed(str(error)) from None

    def receive(self, timeout_s: float | None = None) -> tuple[dict[str, Any], list[int]] | None:
        """The next frame and its descriptors; None if none began within ``timeout_s`` (None: wait as long
        as it takes). Once a frame has begun, the rest must follow within ``frame_timeout_s``."""
        if not self._readable(timeout_s):
            return None
        deadline = time.monotonic() + self.frame_timeout_s
        try:
            header, fds = self._read_header(deadline)
        except ConnectionResetError:  # the other end died with data unread
            raise ChannelClosed("the other end closed the channel") from None
        length, fd_count = _HEADER.unpack(header)
        if length > self.max_frame_bytes or fd_count > MAX_FDS or len(fds) != fd_count:
            _close_all(fds)
            raise ChannelClosed(f"bad frame: {length} bytes, {fd_count} descriptors announced, {len(fds)} sent")
        try:
            message = json.loads(self._read_exactly(length, deadline))
        except ConnectionResetError:
            _close_all(fds)
            raise ChannelClosed("the channel closed in the middle of a frame") from None
        except (ValueError, RecursionError):
            _close_all(fds)
            raise ChannelClosed("a frame that is not JSON") from None
        if not isinstance(message, dict):
            _close_all(fds)
            raise ChannelClosed("a frame that is not a JSON object")
        return message, fds

    def close(self) -> None:
        self.sock.close()

    def _read_header(self, deadline: float) -> tuple[bytes, list[int]]:
        self._wait_readable(deadline)
        data, fds, _flags, _address = socket.recv_fds(self.sock, _HEADER.size, MAX_FDS)
        if not data:
            _close_all(fds)
            raise ChannelClosed("the other end closed the channel")
        return data + self._read_exactly(_HEADER.size - len(data), deadline), list(fds)

    def _read_exactly(self, count: int, deadline: float) -> bytes:
        chunks: list[bytes] = []
        while count > 0:
            self._wait_readable(deadline)
            chunk = self.sock.recv(min(count, 1 << 20))
            if not chunk:
                raise ChannelClosed("the channel closed in the middle of a frame")
            chunks.append(chunk)
            count -= len(chunk)
        return b"".join(chunks)

    def _wait_readable(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not self._readable(remaining):
            raise ChannelClosed(f"a frame took longer than {self.frame_timeout_s:.0f} s to arrive")

    def _readable(self, timeout_s: float | None) -> bool:
        """poll, not select: select fails on descriptors numbered 1024 and above, which a server holding
        a thousand client connections hands out."""
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        return bool(poller.poll(None if timeout_s is None else max(0, math.ceil(timeout_s * 1000))))


def _close_all(fds: Sequence[int]) -> None:
    import os

    for fd in fds:
        os.close(fd)

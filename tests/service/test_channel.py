"""Frames between a supervisor and a sandboxed child: waits, timeouts, descriptors, hostile frames."""

from __future__ import annotations

import os
import struct
import threading
import time

import pytest

from service.sandbox.channel import Channel, ChannelClosed


@pytest.fixture
def pair():
    mine, theirs = Channel.pair(max_frame_bytes=1024)
    mine.frame_timeout_s = 0.3
    other = Channel(theirs, max_frame_bytes=1024, frame_timeout_s=0.3)
    yield mine, other
    mine.close()
    other.close()


@pytest.mark.slow
def test_a_frame_may_be_long_in_coming_but_not_long_in_arriving(pair):
    """Waiting for a frame is unbounded without a timeout (a job's result comes after hours); a frame
    that has begun must finish within frame_timeout_s (a child cannot stall its supervisor)."""
    mine, other = pair
    threading.Timer(1.0, other.send, args=({"kind": "done"},)).start()  # later than frame_timeout_s
    assert mine.receive() == ({"kind": "done"}, [])
    assert mine.receive(0.05) is None
    other.sock.sendall(struct.pack(">IB", 100, 0) + b"{")  # a header, then silence
    started = time.monotonic()
    with pytest.raises(ChannelClosed, match="longer than"):
        mine.receive(1.0)
    assert time.monotonic() - started < 2


def test_descriptors_travel_with_their_frame(pair, tmp_path):
    mine, other = pair
    path = tmp_path / "input"
    path.write_bytes(b"the upload")
    with path.open("rb") as file:
        mine.send({"function": "model"}, [file.fileno()])
    message, fds = other.receive(5)
    assert message == {"function": "model"} and len(fds) == 1
    assert os.pread(fds[0], 100, 0) == b"the upload"
    os.close(fds[0])


@pytest.mark.parametrize(
    "frame",
    [
        struct.pack(">IB", 10_000, 0),
        struct.pack(">IB", 4, 0) + b"nope",
        struct.pack(">IB", 2, 0) + b"[]",
        struct.pack(">IB", 2, 3) + b"{}",
    ],
    ids=["over the size bound", "not JSON", "not an object", "descriptors announced, none sent"],
)
def test_hostile_frames_close_the_channel(pair, frame):
    mine, other = pair
    other.sock.sendall(frame)
    with pytest.raises(ChannelClosed):
        mine.receive(1.0)


def test_a_closed_end_is_reported(pair):
    mine, other = pair
    other.close()
    with pytest.raises(ChannelClosed):
        mine.receive(1.0)


def test_channels_work_with_descriptors_numbered_past_1024():
    """A server holding a thousand client connections hands its next socketpair descriptors past 1024,
    where select() raises ValueError: the channel polls instead."""
    import fcntl
    import resource
    import socket

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below 1200")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    try:
        left, right = socket.socketpair()
        high = [socket.socket(fileno=fcntl.fcntl(s.fileno(), fcntl.F_DUPFD, 1100)) for s in (left, right)]
        left.close(), right.close()
        mine, other = Channel(high[0], 1024, 0.5), Channel(high[1], 1024, 0.5)
        assert mine.fileno() >= 1024
        other.send({"kind": "hello"})
        assert mine.receive(1.0) == ({"kind": "hello"}, [])
        assert mine.receive(0.05) is None
        mine.close(), other.close()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

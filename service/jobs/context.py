"""What a job handler (``service.jobs.handlers``) is given inside the sandboxed job process: its parameters,
its input files as descriptors, progress and cancel plumbing, and the two requests it may make of the
supervisor (a cached sensitivity result, storing one)."""

from __future__ import annotations

import os
import queue
import shutil
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np

from service.jobs.errors import Cancelled
from service.sandbox.channel import Channel, ChannelClosed

PROGRESS_INTERVAL_S = 0.2  # libraries may report every probe; the channel needs far fewer frames


class ChildContext:
    """What a handler gets: its parameters and inputs, progress and cancel plumbing, and the
    things it may ask the supervisor for (a cached sensitivity result or latency table, storing one)."""

    def __init__(self, channel: Channel, job: dict[str, Any], fds: dict[str, int], workdir: Path) -> None:
        self.channel = channel
        self.job_type: str = job["type"]
        self.params: dict[str, Any] = job["params"]
        self.model: dict[str, Any] = job["model"]  # name, format, sample_axes (a latency job's plan's)
        self.fds = fds
        self.workdir = workdir
        self.cancel_event = threading.Event()
        self._replies: queue.Queue[dict[str, Any]] = queue.Queue()
        self._last_progress: tuple[str | None, float] = (None, 0.0)

    # ------------------------------------------------ reporting

    def progress(self, phase: str, fraction: float, message: str = "") -> None:
        self.check_cancelled()
        now = time.monotonic()
        last_phase, last_time = self._last_progress
        if phase == last_phase and now - last_time < PROGRESS_INTERVAL_S:
            return
        self._last_progress = (phase, now)
        self.channel.send({"kind": "progress", "phase": phase, "fraction": float(fraction), "message": message})

    def log(self, line: str) -> None:
        self.channel.send({"kind": "log", "line": line})

    def check_cancelled(self) -> None:
        if self.cancel_event.is_set():
            raise Cancelled()

    # ------------------------------------------------ the two requests

    def cached_sensitivity(self, method: str, params_hash: str) -> dict[str, Any] | None:
        """A stored result of this analysis on this job's model and calibration data, if any."""
        self.channel.send({"kind": "lookup_sensitivity", "method": method, "params_hash": params_hash})
        reply = self._replies.get()
        return reply.get("result")

    def save_sensitivity(self, method: str, params_hash: str, result: dict[str, Any]) -> None:
        self.channel.send({"kind": "save_sensitivity", "method": method, "params_hash": params_hash, "result": result})

    def cached_latency_table(self, key: dict[str, Any]) -> dict[str, Any] | None:
        """A stored latency table of this job's model with ``key``'s device, provider, onnxruntime
        version, batch size and candidates (``planner.latency_table.table_key``), if any."""
        self.channel.send({"kind": "lookup_latency_table", "key": key})
        reply = self._replies.get()
        return reply.get("result")

    def save_latency_table(self, table: dict[str, Any]) -> None:
        self.channel.send({"kind": "save_latency_table", "table": table})

    # ------------------------------------------------ inputs and outputs

    @contextmanager
    def model_path(self) -> Iterator[Path]:
        """The model as a file in this process's own directory; a zip bundle (ONNX + external
        data) is unpacked there (its members were checked at upload, their sizes are bounded by
        the zip headers and RLIMIT_FSIZE)."""
        root = self.workdir / "model"
        root.mkdir()
        try:
            with self._open("model") as source:
                if self.model["format"] == "onnx_archive":
                    with zipfile.ZipFile(source) as archive:
                        archive.extractall(root)
                    yield next(root.rglob("*.onnx"))
                    return
                suffix = ".pt2" if self.model["format"] == "torch_export" else ".onnx"
                path = root / f"model{suffix}"
                with path.open("wb") as copy:
                    shutil.copyfileobj(source, copy, 1 << 20)
            yield path
        finally:
            shutil.rmtree(root, ignore_errors=True)

    def arrays(self, name: str) -> dict[str, np.ndarray]:
        """The arrays of dataset input ``name`` ("calibration", "evaluation"), read without pickle."""
        with self._open(name) as file, np.load(file, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}

    def arrays_if_given(self, name: str) -> dict[str, np.ndarray] | None:
        return self.arrays(name) if name in self.fds else None

    def _open(self, name: str) -> IO[bytes]:
        """A file object over input ``name`` from its start (a duplicate shares the offset: seek)."""
        file = os.fdopen(os.dup(self.fds[name]), "rb")
        file.seek(0)
        return file

    def write_artifact(self, data: bytes) -> None:
        with os.fdopen(os.dup(self.fds["artifact"]), "wb") as artifact:
            artifact.write(data)

    # ------------------------------------------------ the channel's reader

    def listen(self) -> None:
        """Runs in a thread: cancels and replies from the supervisor."""
        while True:
            try:
                received = self.channel.receive()
            except ChannelClosed:
                self.cancel_event.set()  # the supervisor is gone: stop at the next step
                self._replies.put({})
                return
            if received is None:
                continue
            message, _fds = received
            if message.get("kind") == "cancel":
                self.cancel_event.set()
            else:
                self._replies.put(message)


Handler = Callable[[ChildContext], dict[str, Any]]

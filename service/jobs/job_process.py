"""The sandboxed process that runs one job's computation (``python -m service.jobs.job_process``).

It holds no database URL and no path into the store: the supervisor (``service.jobs.supervisor``)
sends the job's parameters and its input files as open descriptors, and everything the job
produces goes back as frames on the channel (progress, log lines, a sensitivity result to cache,
the final result) plus the bytes of an artifact written to a descriptor the supervisor gave.
The supervisor stores them. What each job type computes is in ``service.jobs.handlers``.
"""

from __future__ import annotations

import errno
import os
import queue
import shutil
import threading
import time
import traceback
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np

from service.jobs.lifecycle import Cancelled, JobInputError
from service.sandbox.channel import Channel, ChannelClosed
from service.sandbox.child import enter_sandbox

PROGRESS_INTERVAL_S = 0.2  # libraries may report every probe; the channel needs far fewer frames


class ChildContext:
    """What a handler gets: its parameters and inputs, progress and cancel plumbing, and the
    two things it may ask the supervisor for (a cached sensitivity result, storing one)."""

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
HANDLERS: dict[str, Handler] = {}


def job_handler(job_type: str) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        HANDLERS[job_type] = handler
        return handler

    return register


def run(context: ChildContext) -> dict[str, Any]:
    """The final frame: ``done`` with the handler's payload, or ``failed`` with a code and a message."""
    import service.jobs.handlers  # noqa: F401  (registers the handlers; pulls in torch)

    try:
        handler = HANDLERS.get(context.job_type)
        if handler is None:
            raise JobInputError(f"unknown job type {context.job_type!r}")
        return {"kind": "done", "result": handler(context)}
    except Cancelled:
        return {"kind": "failed", "code": "cancelled", "message": "cancelled by request"}
    except JobInputError as error:
        return {"kind": "failed", "code": error.code, "message": str(error)}
    except MemoryError:
        return {
            "kind": "failed",
            "code": "resource_limit",
            "message": "the job ran out of its memory budget (MPQ_JOB_MEMORY_BYTES); use a smaller batch_size "
            "or fewer probes per pass, or raise the budget",
        }
    except OSError as error:
        if error.errno != errno.EFBIG:
            raise
        return {
            "kind": "failed",
            "code": "resource_limit",
            "message": "the job wrote a file larger than its limit (MPQ_MAX_DECOMPRESSED_BYTES)",
        }
    except Exception as error:  # the job fails with a reason; the supervisor keeps the traceback in the log
        context.log(traceback.format_exc())
        return {"kind": "failed", "code": "internal", "message": f"internal error: {type(error).__name__}: {error}"}


def main() -> None:
    channel, report = enter_sandbox()
    channel.send({"kind": "sandbox", "report": report.describe()})
    received = channel.receive()
    if received is None:
        return
    job, fds = received
    names: list[str] = job.get("files", [])
    context = ChildContext(channel, job, dict(zip(names, fds)), Path.cwd())
    threading.Thread(target=context.listen, daemon=True, name="channel-reader").start()
    channel.send(run(context))


if __name__ == "__main__":
    # run as the module ``service.jobs.job_process`` (not ``__main__``), the one the handlers register in
    from service.jobs.job_process import main as module_main

    module_main()

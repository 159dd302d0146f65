"""Progress on a stream: a bar redrawn in place on a terminal, plain throttled lines otherwise.

One printer serves the local commands (the libraries call it with ``(phase, fraction,
message)``) and everything that follows a job over HTTP (``follow_job`` adapts job dicts).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TextIO

from service.job_status import FINISHED


class ProgressPrinter:
    """``progress(phase, fraction, message)`` on stderr: a bar redrawn in place on a terminal,
    plain lines otherwise (at most one per phase change or per second, none repeating the last, so
    logs stay short)."""

    WIDTH = 30

    def __init__(self, stream: TextIO, interval_s: float = 1.0) -> None:
        self._stream = stream
        self._tty = stream.isatty()
        self._interval = interval_s
        self._phase = ""
        self._last = 0.0
        self._shown: tuple[str, float, str] | None = None
        self._open_line = False

    def __call__(self, phase: str, fraction: float, message: str) -> None:
        fraction = min(max(float(fraction), 0.0), 1.0)
        if self._tty:
            filled = round(fraction * self.WIDTH)
            bar = "#" * filled + "." * (self.WIDTH - filled)
            self._stream.write(f"\r\x1b[K[{bar}] {phase}: {message}"[:200])
            self._open_line = True
        else:
            now = time.monotonic()
            unchanged = self._shown == (phase, fraction, message)  # a poll that found no news
            if unchanged or (phase == self._phase and now - self._last < self._interval and fraction < 1.0):
                return
            self._shown = (phase, fraction, message)
            self._stream.write(f"{phase} {fraction:4.0%} {message}\n")
            self._last = now
        self._phase = phase
        self._stream.flush()

    def finish(self) -> None:
        if self._open_line:
            self._stream.write("\n")
            self._stream.flush()
            self._open_line = False


def follow_job(printer: ProgressPrinter) -> Callable[[dict[str, Any]], None]:
    """An ``on_progress`` callback for ``MpqClient.wait`` that shows a job through ``printer``."""

    def show(job: dict[str, Any]) -> None:
        progress = job["progress"]
        printer(progress["phase"] or job["status"], progress["fraction"] or 0.0, progress["message"] or job["status"])
        if job["status"] in FINISHED:
            printer.finish()

    return show

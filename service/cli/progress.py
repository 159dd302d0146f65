"""Progress on a stream: a bar redrawn in place on a terminal, plain throttled lines otherwise.

One printer serves the local commands (the libraries call it with ``(phase, fraction,
message)``) and everything that follows a job over HTTP (``follow_job`` adapts job dicts).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

JOB_FINISHED = ("succeeded", "failed", "cancelled")


def shortened(text: str, width: int) -> str:
    """``text`` in at most ``width`` characters, keeping its end: the last parts of a node name or
    module path say the most (``…/attention/self/query/MatMul``). The CLI's tables and the
    dashboard's (which puts the whole in a title attribute) both use it."""
    return text if len(text) <= width else "…" + text[len(text) - width + 1 :]


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
            filled = int(round(fraction * self.WIDTH))
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
        if job["status"] in JOB_FINISHED:
            printer.finish()

    return show


def describe_execution(execution: Mapping[str, Any]) -> str:
    """ "batch 16 x 3 probes per pass, double_backward (6.4 gradients per probe), peak RSS 2649 MiB;
    probes stopped: max_probes, worst SE/|trace| 8.17" (sensitivity.budget's report, in one line)."""
    parts = [
        f"batch {execution['batch_size']} x {execution['probes_per_pass']} probes per pass, {execution['hvp_method']}"
    ]
    if execution.get("probe_cost_gradients") is not None:
        parts[0] += f" ({execution['probe_cost_gradients']:.2g} gradients per probe)"
    if execution.get("peak_rss_mb") is not None:
        parts[0] += f", peak RSS {execution['peak_rss_mb']:.0f} MiB"
    traces = execution.get("traces") or {}
    if traces:
        worst = traces.get("worst_relative_se")
        parts.append(
            f"probes stopped: {traces['stopped']}" + ("" if worst is None else f", worst SE/|trace| {worst:.3g}")
        )
    return "; ".join(parts)

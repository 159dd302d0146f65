"""The progress printer on a stream that is not a terminal: lines, throttled, never repeated."""

from __future__ import annotations

import io

from service.cli.progress import ProgressPrinter


def test_a_poll_that_found_no_news_prints_nothing():
    stream = io.StringIO()
    printer = ProgressPrinter(stream, interval_s=0.0)
    for _ in range(3):
        printer("sensitivity:traces", 0.33, "84 probes")
    printer("sensitivity:traces", 0.34, "88 probes")
    printer("plan:search", 0.0, "started")
    assert stream.getvalue().splitlines() == [
        "sensitivity:traces  33% 84 probes",
        "sensitivity:traces  34% 88 probes",
        "plan:search   0% started",
    ]


def test_lines_within_a_phase_are_throttled():
    stream = io.StringIO()
    printer = ProgressPrinter(stream, interval_s=60.0)
    for probes in range(10):
        printer("sensitivity:traces", probes / 10, f"{probes} probes")
    printer("sensitivity:done", 1.0, "done")
    assert len(stream.getvalue().splitlines()) == 2

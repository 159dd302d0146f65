"""How an ``mpq`` command ends when it is told to stop, and how its processes end with it.

Ctrl-C (SIGINT) and ``kill`` (SIGTERM: a container's stop, a CI runner's cancel) take the same way out
as an error: every ``finally`` block and context manager runs (a server stops accepting and puts its
running jobs back in the queue, the demo stops its server, a half-written file is removed), then one
line on stderr instead of a traceback and the exit status a shell gives a process ended by that
signal: 130 (SIGINT) or 143 (SIGTERM). Before, SIGTERM ended the process on the spot (no cleanup) and
Ctrl-C printed a ``KeyboardInterrupt`` traceback.

SIGTERM is raised in the main thread as ``Terminated``, a ``KeyboardInterrupt``, so it takes the way
Ctrl-C takes through our code and the libraries'.
"""

from __future__ import annotations

import functools
import multiprocessing
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import FrameType
from typing import TYPE_CHECKING, NoReturn, Protocol

from service.cli.output import ExitCode, report_failure
from service.sandbox.child import die_with_parent

if TYPE_CHECKING:
    from fastapi import FastAPI

STOPS = {signal.SIGINT: ExitCode.INTERRUPTED, signal.SIGTERM: ExitCode.TERMINATED}


class Main(Protocol):
    """The command line's entry point: ``main(argv)`` -> exit status."""

    def __call__(self, argv: Sequence[str] | None = None) -> int: ...


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: raised in the main thread as Ctrl-C raises ``KeyboardInterrupt``."""


def stop(signum: int) -> NoReturn:
    """Raise what the signal ``signum`` raises (for code that caught the signal itself: uvicorn's
    supervisor of API processes, a Celery worker)."""
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def reported_stops(main: Main) -> Main:
    """``main`` with SIGTERM raised as ``Terminated`` while it runs, and a stop (either signal) said in
    one line (one JSON document too where the command was given ``--json``, as every failure is) and
    turned into its exit status."""

    @functools.wraps(main)
    def run(argv: Sequence[str] | None = None) -> int:
        with _sigterm_raises():
            try:
                return main(argv)
            except KeyboardInterrupt as interrupt:
                signum = signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT
                words = "terminated" if signum == signal.SIGTERM else "interrupted"
                as_json = "--json" in (sys.argv[1:] if argv is None else argv)
                return report_failure(
                    f"{words} ({signal.Signals(signum).name})", STOPS[signum], as_json=as_json, problem=words
                )

    return run


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM raises ``Terminated`` until the block ends; the handlers of SIGINT and SIGTERM are put
    back after it (uvicorn's supervisor replaces them for good; tests call ``main`` in-process). Only the
    main thread can set handlers; a SIGTERM that was ignored stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {signum: signal.getsignal(signum) for signum in STOPS}
    if before[signal.SIGTERM] is not signal.SIG_IGN:
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        for signum, handler in before.items():
            if handler is not None:  # None: set outside Python; nothing to put back
                signal.signal(signum, handler)


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated()


# ---------------------------------------------------------------- children that die with their parent


def api_worker_app() -> FastAPI:
    """The app of one API process of ``mpq serve --api-workers N`` (uvicorn's factory). The process
    is spawned by uvicorn's supervisor and would outlive it: killed with SIGKILL, the supervisor left
    its API processes serving, the multiprocessing resource tracker they hold open, and every
    inspector and job process under them. Each now dies with the supervisor (its running jobs are
    requeued by the next server, as after any crash); a stop by signal still reaches it through the
    supervisor, which ends it with SIGTERM (a graceful stop that requeues its jobs)."""
    from service.app import create_app

    parent = multiprocessing.parent_process()
    if parent is not None and parent.pid is not None:
        die_with_parent(parent.pid)
    return create_app()

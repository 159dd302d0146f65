"""The processes a test session started and left running (tests/conftest.py fails a module that leaves
any), and the tree of processes under an ``mpq`` command (tests/service/test_signals.py).

A test's process is found two ways: below the pytest process (``children(recursive=True)``), and by
the mark every process the session starts inherits in its environment (``SESSION_MARK``): a process
whose parent died (a server killed with SIGKILL, say) is left to init, out of pytest's tree; issue 16
saw two processes of a test that killed a server run on for 40 minutes. Sandboxed children get a
scrubbed environment, but they die with their parent (``PR_SET_PDEATHSIG``), so they are found below a
marked one while it lives.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable

import psutil

SESSION_MARK = "MPQ_TEST_SESSION"  # holds the pytest process's pid
STRAGGLER_WAIT_S = 15.0  # a process told to stop a moment ago may still be ending: it gets this long


def mark_session() -> None:
    os.environ[SESSION_MARK] = str(os.getpid())


def descendants(pid: int) -> list[psutil.Process]:
    """The processes below ``pid``, alive (a zombie is dead, only not yet reaped)."""
    try:
        return [child for child in psutil.Process(pid).children(recursive=True) if _running(child)]
    except psutil.NoSuchProcess:
        return []


def session_processes() -> list[psutil.Process]:
    """Every running process this session started: below pytest, or carrying its mark, and theirs."""
    me = os.getpid()
    found = {process.pid: process for process in descendants(me)}
    for process in psutil.process_iter():
        if process.pid == me or process.pid in found:
            continue
        try:
            marked = process.environ().get(SESSION_MARK) == str(me)
        except (psutil.Error, OSError):  # gone, or not ours to read
            continue
        if marked and _running(process):
            found[process.pid] = process
            found.update((child.pid, child) for child in descendants(process.pid))
    return list(found.values())


def leftovers(expected: Callable[[psutil.Process], bool] = lambda _process: False) -> list[psutil.Process]:
    """The session's processes that are not ``expected``, once those still ending have had
    ``STRAGGLER_WAIT_S`` to end."""
    deadline = time.monotonic() + STRAGGLER_WAIT_S
    while True:
        left = [process for process in session_processes() if not expected(process)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def wait_gone(processes: Iterable[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Wait up to ``timeout_s`` for every one of ``processes`` to end; returns those still running (a
    zombie has ended: psutil's wait_procs waits for it to be reaped, which is its parent's business)."""
    deadline = time.monotonic() + timeout_s
    alive = list(processes)
    while (alive := [process for process in alive if _running(process)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


def describe(processes: Iterable[psutil.Process]) -> str:
    lines = []
    for process in processes:
        try:
            lines.append(f"  pid {process.pid} (parent {process.ppid()}): {' '.join(process.cmdline())[:300]}")
        except psutil.Error:
            lines.append(f"  pid {process.pid}: ended while being described")
    return "\n".join(lines)


def kill(processes: Iterable[psutil.Process]) -> None:
    """SIGKILL what a test left (after reporting it), so that it does not weigh on the tests after it."""
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.kill()


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False

"""How tests/conftest.py finds the processes a test left running (tests/processes.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from tests import processes

_START_AN_ORPHAN = """
import subprocess, sys
sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
print(subprocess.Popen(sleeper, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid)
"""


def test_a_process_whose_parent_died_is_found_by_the_sessions_mark():
    """A server killed with SIGKILL leaves its children to init, out of pytest's tree; they carry the
    session's mark in their environment."""
    started = subprocess.run([sys.executable, "-c", _START_AN_ORPHAN], capture_output=True, text=True, check=True)
    orphan = int(started.stdout)
    try:
        assert orphan not in {process.pid for process in processes.descendants(os.getpid())}
        assert orphan in {process.pid for process in processes.session_processes()}
    finally:
        os.kill(orphan, signal.SIGKILL)
    assert not processes.wait_gone([p for p in processes.session_processes() if p.pid == orphan], 10)

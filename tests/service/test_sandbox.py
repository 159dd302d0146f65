"""What a sandboxed child (a job or an upload inspector) can and cannot do, tried from inside one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from service.sandbox.child import SandboxLimits, start_child

REPO = Path(__file__).resolve().parents[2]
LIMITS = SandboxLimits(memory_bytes=1 << 30, cpu_time_s=60, file_size_bytes=1 << 20)


@pytest.fixture
def probe(monkeypatch, tmp_path):
    """A started probe child (tests/service/sandbox_probe.py) and its hello message; the supervisor's
    environment holds a database URL and a token the child must not see."""
    monkeypatch.setenv("MPQ_DATABASE_URL", "postgresql+psycopg://mpq:secret@127.0.0.1/mpq")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-for-children")
    store = tmp_path / "store"
    store.mkdir()
    (store / "blob").write_text("stored bytes")
    child = start_child("tests.service.sandbox_probe", LIMITS, env={"PYTHONPATH": str(REPO)}, hide=[store])
    hello = child.channel.receive(30)
    assert hello is not None, child.log_tail()
    yield child, hello[0], store
    child.close()


def ask(child, fds=(), **request) -> str:
    child.channel.send(request, list(fds))
    reply = child.channel.receive(30)
    assert reply is not None, child.log_tail()
    return reply[0]["answer"]


def test_the_environment_holds_no_setting_or_credential(probe):
    _child, hello, _store = probe
    assert not [name for name in hello["environ"] if name.startswith("MPQ_") or "SECRET" in name]
    assert "HOME" in hello["environ"] and "TMPDIR" in hello["environ"]


def test_memory_is_bounded_and_the_limit_cannot_be_raised(probe):
    child, hello, _store = probe
    assert hello["data_limit"] == LIMITS.memory_bytes
    assert ask(child, action="allocate", bytes=2 << 30) == "refused: MemoryError"
    assert ask(child, action="allocate", bytes=64 << 20).startswith("ok")
    assert ask(child, action="raise_limit").startswith("refused")


def test_the_network_and_the_store_are_out_of_reach(probe):
    child, hello, store = probe
    if "network isolated" not in hello["report"]:
        pytest.skip(f"no namespaces on this platform: {hello['report']}")
    assert ask(child, action="connect", port=5432).startswith("refused")  # PostgreSQL listens there
    assert ask(child, action="read", path=str(store / "blob")).startswith("refused")


def test_root_becomes_an_unprivileged_user_that_still_reads_its_descriptors(probe, tmp_path):
    child, hello, _store = probe
    if os.geteuid() != 0 or "user nobody" not in hello["report"]:
        pytest.skip(f"the sandbox keeps the user here: {hello['report']}")
    secret = tmp_path / "root-only"
    secret.write_text("root's secret")
    secret.chmod(0o600)
    assert hello["uid"] != 0
    assert ask(child, action="read", path=str(secret)).startswith("refused")
    with secret.open("rb") as handle:  # what the supervisor hands over stays readable
        assert ask(child, [handle.fileno()], action="read_fd") == "ok: root's secret"
    assert ask(child, action="import", module="sqlite3") == "ok: sqlite3"  # lazy imports still work


def test_the_child_dies_with_its_supervisor(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from service.sandbox.child import SandboxLimits, start_child
        child = start_child("tests.service.sandbox_probe", SandboxLimits(1 << 30, 60, 1 << 20),
                            env={{"PYTHONPATH": {str(REPO)!r}}})
        child.channel.receive(30)
        print(child.pid, flush=True)
        time.sleep(600)
    """)
    supervisor = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        child_pid = int(supervisor.stdout.readline())
    finally:  # killed in any case: without its child's pid it would sleep on for 10 minutes
        os.kill(supervisor.pid, signal.SIGKILL)
        supervisor.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(child_pid):
        time.sleep(0.1)
    assert not _alive(child_pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"  # a zombie awaiting its reaper is dead
    except (ProcessLookupError, FileNotFoundError):
        return False

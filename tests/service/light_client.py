"""The light client install (``pip install mpq``, no torch): the CLI run with the heavy packages made
unimportable, and real virtual environments built from a copy of the sources (for
tests/service/test_installs.py and bench/client_install.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
# What a CI job that only talks to a server does not install (pyproject's `local` and `server` extras).
BLOCKED = ("torch", "onnx", "onnxruntime", "fastapi", "sqlalchemy", "celery", "scipy", "sklearn", "onnxscript")
# The libraries' packages: installed with the client (their code is small) but never imported by it.
LIBRARIES = ("sensitivity", "planner")

# Runs `mpq ARGS` (python -m service.cli) with a finder first on sys.meta_path that refuses every
# blocked package as if it were not installed (ModuleNotFoundError, also from importlib.util.find_spec),
# and writes at exit which blocked names were asked for and which of them and of LIBRARIES were loaded.
_BLOCKING_RUNNER = """
import atexit, json, runpy, sys

blocked, libraries, report = set(sys.argv[1].split(",")), sys.argv[2].split(","), sys.argv[3]
asked = []


class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in blocked:
            asked.append(name)
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None


def write_report():
    loaded = sorted(name for name in sys.modules if name.partition(".")[0] in blocked | set(libraries))
    with open(report, "w") as file:
        json.dump({"asked": asked, "loaded": loaded}, file)


sys.meta_path.insert(0, Blocker())
atexit.register(write_report)
sys.argv = ["mpq", *sys.argv[4:]]
runpy.run_module("service.cli", run_name="__main__", alter_sys=True)
"""


def run_blocked_mpq(
    *args: str, report: Path, env: dict[str, str] | None = None, timeout: float = 120
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """``mpq ARGS`` from this tree with BLOCKED unimportable: the process and its import report
    (``asked``: blocked names something tried to import or find; ``loaded``: blocked or library
    modules in sys.modules at exit). ``report`` is the file the report is written to."""
    environment = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    command = [sys.executable, "-c", _BLOCKING_RUNNER, ",".join(BLOCKED), ",".join(LIBRARIES), str(report), *args]
    finished = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=timeout)
    return finished, json.loads(report.read_text())


# What the distribution is built from (as docker/Dockerfile copies it).
SOURCES = ("pyproject.toml", "README.md", "service", "planner", "sensitivity", "migrations")


def copy_sources(target: Path) -> Path:
    """The project's sources copied to ``target`` (pip builds a local project in its folder: the
    build leaves build/ and *.egg-info behind, which must not land in the working tree)."""
    target.mkdir(parents=True)
    for name in SOURCES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(source, target / name)
    return target


def create_venv(folder: Path, timeout: float = 120) -> Path:
    """A fresh virtual environment (with pip) at ``folder``; its python."""
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True, timeout=timeout)
    return folder / "bin" / "python"


def pip_install(python: Path, *requirements: str, timeout: float) -> float:
    """``pip install REQUIREMENTS`` into ``python``'s environment (pip's cache and the machine's pip
    configuration as they are); the seconds it took. CalledProcessError with pip's output on failure."""
    started = time.perf_counter()
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *requirements],
        check=True,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return time.perf_counter() - started


def disk_usage_bytes(folder: Path) -> int:
    """What ``du -sB1`` says the folder takes on disk."""
    output = subprocess.run(["du", "-sB1", str(folder)], check=True, capture_output=True, text=True).stdout
    return int(output.split()[0])


def findable(python: Path, modules: tuple[str, ...]) -> list[str]:
    """The modules ``python``'s environment could import (found, not imported)."""
    script = "import importlib.util, sys; print(','.join(n for n in sys.argv[1:] if importlib.util.find_spec(n)))"
    output = subprocess.run([str(python), "-c", script, *modules], check=True, capture_output=True, text=True)
    return [name for name in output.stdout.strip().split(",") if name]

"""Install size and time of the light client (`pip install mpq`: no torch, for CI jobs that only talk
to a server) against the full server install, each into a fresh virtual environment.

Each install builds the project from a copy of the sources (as docker/Dockerfile does) with this
machine's pip configuration and pip's cache as they are (run it twice for warm-cache figures). The
full install takes torch as scripts/setup.sh does, `torch==2.13.0` (a CPU build on these machines;
an unpinned torch pulls GB of CUDA wheels), then `.[server]`. Prints wall time and `du` of each venv.

    .venv/bin/python bench/client_install.py [--light-only] [--timeout-s 900]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository, not bench/, comes first

import argparse
import subprocess
import tempfile
import time

from tests.service.light_client import BLOCKED, copy_sources, create_venv, disk_usage_bytes, findable, pip_install

MB = 1e6


def measure(root: Path, name: str, installs: list[list[str]], timeout_s: float) -> dict[str, float]:
    """A fresh venv at root/name, then each pip install in turn: seconds (venv creation apart), size."""
    started = time.perf_counter()
    python = create_venv(root / name)
    venv_s = time.perf_counter() - started
    empty = disk_usage_bytes(root / name)
    install_s = sum(pip_install(python, *requirements, timeout=timeout_s) for requirements in installs)
    help_started = time.perf_counter()
    subprocess.run([str(root / name / "bin" / "mpq"), "--help"], check=True, capture_output=True)
    return {
        "venv_s": venv_s,
        "install_s": install_s,
        "size_mb": disk_usage_bytes(root / name) / MB,
        "empty_mb": empty / MB,
        "help_s": time.perf_counter() - help_started,
        "heavy": len(findable(python, BLOCKED)),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--light-only", action="store_true", help="skip the full install")
    parser.add_argument("--timeout-s", type=float, default=900, help="bound on each pip install")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        source = str(copy_sources(root / "src"))
        rows = {"light (pip install mpq)": measure(root, "light", [[source]], args.timeout_s)}
        if not args.light_only:
            full = [["torch==2.13.0"], [f"{source}[server]"]]
            rows["full (torch==2.13.0, then mpq[server])"] = measure(root, "full", full, args.timeout_s)
    print(f"{'install':<40} {'pip install':>12} {'venv on disk':>13} {'of it, an empty venv':>21} {'mpq --help':>11}")
    for name, row in rows.items():
        print(
            f"{name:<40} {row['install_s']:>10.1f} s {row['size_mb']:>10.0f} MB {row['empty_mb']:>18.0f} MB "
            f"{row['help_s']:>9.2f} s"
        )
        print(f"{'':<40} heavy packages importable: {row['heavy']} of {len(BLOCKED)} ({', '.join(BLOCKED)})")


if __name__ == "__main__":
    main()

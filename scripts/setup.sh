#!/usr/bin/env bash
# Create .venv and install mpq into it. `--dev` adds the test tools and the browser.
# Torch is pinned to 2.13.0 when missing: an unpinned install pulls several GB of CUDA wheels,
# while a CPU build of exactly this version is available locally on these machines.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    "${PIP[@]}" "torch==2.13.0"
fi
if [ "${1:-}" = "--dev" ]; then
    "${PIP[@]}" -e ".[dev]"
    # The dashboard's browser tests drive Debian's chromium (never `playwright install`: no browser downloads).
    if [ ! -x /usr/bin/chromium ]; then
        apt-get update -qq && apt-get install -y -qq chromium >/dev/null
    fi
else
    "${PIP[@]}" -e .
fi

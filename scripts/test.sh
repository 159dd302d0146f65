#!/usr/bin/env bash
# The whole test suite (SQLite and PostgreSQL). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/services.sh
exec .venv/bin/python -m pytest "$@"

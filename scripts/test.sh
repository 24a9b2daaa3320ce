#!/usr/bin/env bash
# Runs every check CI runs: installs what is missing, then ruff, mypy and the tests (which start
# their own Azurite, simulated regions and gateway). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
echo "== ruff"; .venv/bin/ruff check .
echo "== mypy"; .venv/bin/mypy && .venv/bin/mypy bench/floor/function_app.py
echo "== pytest"; .venv/bin/python -m pytest "$@"

#!/usr/bin/env bash
# Installs what the gateway and its tests need into this checkout: a Python 3.11 virtualenv in .venv
# (runtime and test requirements) and Azurite, Microsoft's Table Storage emulator, in .azurite.
# Safe to run again: it only installs what is missing or changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then PYTHON="$candidate"; break; fi
  done
fi
"$PYTHON" - <<'PY' || { echo "setup: Python 3.11 or newer is needed (set PYTHON=...)" >&2; exit 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 11) else 1)
PY

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.requirements.sha
wanted=$(cat requirements.txt tests/requirements.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  echo "setup: installing Python packages"
  if ! .venv/bin/python -m pip install --quiet --disable-pip-version-check \
      -r requirements.txt -r tests/requirements.txt >.venv/pip.log 2>&1; then
    cat .venv/pip.log >&2; echo "setup: pip install failed" >&2; exit 1
  fi
  echo "$wanted" > "$stamp"
fi

AZURITE_VERSION=3.35.0
if [ ! -f .azurite/node_modules/azurite/dist/src/table/main.js ]; then
  command -v node >/dev/null 2>&1 || { echo "setup: Node.js is needed for Azurite" >&2; exit 1; }
  echo "setup: installing Azurite $AZURITE_VERSION (npm)"
  mkdir -p .azurite
  npm install --silent --no-audit --no-fund --prefix .azurite "azurite@$AZURITE_VERSION" >/dev/null
fi

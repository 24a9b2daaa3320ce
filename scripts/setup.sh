#!/usr/bin/env bash
# Installs what the gateway and its tests need into this checkout: a Python 3.13 virtualenv in .venv
# (runtime, local-host and test requirements, and the Functions worker protocol's generated classes)
# and Azurite, Microsoft's Storage emulator, in .azurite. Safe to run again: it only installs what is
# missing or changed.
set -euo pipefail
cd "$(dirname "$0")/.."

works() {  # is $1 a Python 3.13 interpreter that runs? (a pyenv shim may exist and refuse to run)
  "$1" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 13) else 1)' >/dev/null 2>&1
}

PYTHON="${PYTHON:-}"
if [ -n "$PYTHON" ] && ! works "$PYTHON"; then
  echo "setup: PYTHON=$PYTHON is not a working Python 3.13" >&2; exit 1
fi
if [ -z "$PYTHON" ]; then
  candidates=()
  if command -v pyenv >/dev/null 2>&1; then
    for p in "$(pyenv root)"/versions/3.13.*/bin/python3.13; do [ -x "$p" ] && candidates+=("$p"); done
  fi
  for name in python3.13 python3; do
    command -v "$name" >/dev/null 2>&1 && candidates+=("$(command -v "$name")")
  done
  candidates+=(/usr/local/bin/python3.13 /usr/bin/python3.13)
  for candidate in "${candidates[@]}"; do
    if works "$candidate"; then PYTHON="$candidate"; break; fi
  done
fi
[ -n "$PYTHON" ] || { echo "setup: Python 3.13 is needed (none found that runs; set PYTHON=...)" >&2; exit 1; }

if [ -x .venv/bin/python ] && ! works .venv/bin/python; then
  echo "setup: .venv is not Python 3.13; making it anew"
  rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $("$PYTHON" --version)"
  "$PYTHON" -m venv .venv
fi

stamp=.venv/.requirements.sha
wanted=$(cat requirements.txt devkit/requirements.txt tests/requirements.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  echo "setup: installing Python packages"
  if ! .venv/bin/python -m pip install --quiet --disable-pip-version-check \
      -r requirements.txt -r devkit/requirements.txt -r tests/requirements.txt >.venv/pip.log 2>&1; then
    cat .venv/pip.log >&2; echo "setup: pip install failed" >&2; exit 1
  fi
  echo "$wanted" > "$stamp"
fi

# The Functions worker protocol's generated classes (FunctionRpc_pb2 and its gRPC stubs), which the
# runtime library expects its host to hand it. The azure-functions-runtime-v1 wheel ships them under
# tests/protos; it is downloaded (never installed: it would install a top-level `tests` package) and
# only those files are copied into .venv as the package `functions_rpc`.
PROTOS_WHEEL=azure-functions-runtime-v1==1.2.0
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ "$(cat "$site/functions_rpc/.source" 2>/dev/null)" != "$PROTOS_WHEEL" ]; then
  echo "setup: fetching the Functions worker protocol classes ($PROTOS_WHEEL)"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  .venv/bin/python -m pip download --quiet --disable-pip-version-check --no-deps -d "$tmp" "$PROTOS_WHEEL" \
    >"$tmp/log" 2>&1 || { cat "$tmp/log" >&2; echo "setup: download of $PROTOS_WHEEL failed" >&2; exit 1; }
  .venv/bin/python - "$tmp" "$site/functions_rpc" "$PROTOS_WHEEL" <<'PY'
import pathlib, shutil, sys, zipfile
tmp, target, source = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3]
[wheel] = tmp.glob("*.whl")
shutil.rmtree(target, ignore_errors=True)
with zipfile.ZipFile(wheel) as archive:
    for name in archive.namelist():
        if name.startswith("tests/protos/") and name.endswith(".py"):
            path = target / name.removeprefix("tests/protos/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(archive.read(name))
if not (target / "FunctionRpc_pb2.py").is_file():
    sys.exit(f"setup: {wheel.name} has no tests/protos/FunctionRpc_pb2.py")
(target / ".source").write_text(source)
PY
fi

AZURITE_VERSION=3.35.0
if [ ! -f .azurite/node_modules/azurite/dist/src/azurite.js ]; then
  command -v node >/dev/null 2>&1 || { echo "setup: Node.js is needed for Azurite" >&2; exit 1; }
  echo "setup: installing Azurite $AZURITE_VERSION (npm)"
  mkdir -p .azurite
  npm install --silent --no-audit --no-fund --prefix .azurite "azurite@$AZURITE_VERSION" >/dev/null
fi

# Debian's Chromium, for the usage page's browser test (tests/test_usage_page.py drives it over the DevTools
# protocol). Installed only when missing; needs root (CI and the developers' machines run as root).
if [ ! -x /usr/bin/chromium ]; then
  command -v apt-get >/dev/null 2>&1 || { echo "setup: /usr/bin/chromium is missing and apt-get is not here" >&2; exit 1; }
  echo "setup: installing Chromium (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -qq --no-install-recommends chromium >.venv/chromium.log 2>&1; then
    apt-get update -qq >>.venv/chromium.log 2>&1 || true
    apt-get install -y -qq --no-install-recommends chromium >>.venv/chromium.log 2>&1 \
      || { cat .venv/chromium.log >&2; echo "setup: installing chromium failed" >&2; exit 1; }
  fi
fi

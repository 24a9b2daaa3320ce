#!/usr/bin/env bash
# Runs the whole gateway locally, without Azure Functions Core Tools:
#   Azurite (Table Storage on 10002 and Blob Storage on 10000, for CONTENT_LOG; data kept in
#   .local/azurite), two simulated AOAI regions on ports
#   8001/8002 (unless AOAI_BACKENDS names real backends), a demo subscription key, and
#   `python -m gateway serve` on http://127.0.0.1:${GATEWAY_PORT:-7071}. Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
PY=.venv/bin/python
PORT="${GATEWAY_PORT:-7071}"

if [ ! -f local.settings.json ]; then
  cp local.settings.sample.json local.settings.json
  echo "run-local: created local.settings.json from local.settings.sample.json"
fi

pids=()          # Azurite and the regions: started in sessions of their own, so Ctrl-C reaches only the gateway
gateway_pid=""
azurite_pids=()  # stopped last, with SIGINT
cleanup() {       # the gateway first (it finishes requests and flushes usage into Azurite), then what it needs
  trap - EXIT INT TERM
  if [ -n "$gateway_pid" ]; then
    kill -TERM "$gateway_pid" 2>/dev/null || true
    wait "$gateway_pid" 2>/dev/null || true
  fi
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  # Azurite saves its data on SIGINT only (SIGTERM would lose the last seconds' writes)
  for pid in "${azurite_pids[@]}"; do kill -INT "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_open() { "$PY" -c "import socket,sys; s=socket.socket(); sys.exit(s.connect_ex(('127.0.0.1', int(sys.argv[1]))))" "$1"; }
wait_port() {
  for _ in $(seq 1 200); do port_open "$1" && return 0; sleep 0.1; done
  echo "run-local: nothing came up on port $1" >&2; exit 1
}
setting() {  # the effective value of a setting: the environment over local.settings.json
  "$PY" -c "import sys; from usage import read_environment; print(read_environment().get(sys.argv[1], ''))" "$1"
}

storage=$(setting UsageStorage)
if [[ "$storage" == *"127.0.0.1:10002"* || "$storage" == "UseDevelopmentStorage=true" ]]; then
  if port_open 10002; then
    echo "run-local: something already listens on 10002; using it as Table Storage"
  else
    mkdir -p .local/azurite
    setsid node .azurite/node_modules/azurite/dist/src/table/main.js --tableHost 127.0.0.1 --tablePort 10002 \
      --location .local/azurite --disableTelemetry --skipApiVersionCheck >.local/azurite.log 2>&1 &
    azurite_pids+=($!)
    wait_port 10002
    echo "run-local: Azurite table storage on http://127.0.0.1:10002 (log: .local/azurite.log)"
  fi
fi

content_log=$(setting CONTENT_LOG)
if [[ "$content_log" == *"127.0.0.1:10000"* || "$content_log" == "UseDevelopmentStorage=true" ]]; then
  if port_open 10000; then
    echo "run-local: something already listens on 10000; using it as Blob Storage"
  else
    mkdir -p .local/azurite
    setsid node .azurite/node_modules/azurite/dist/src/blob/main.js --blobHost 127.0.0.1 --blobPort 10000 \
      --location .local/azurite --disableTelemetry --skipApiVersionCheck >.local/azurite-blob.log 2>&1 &
    azurite_pids+=($!)
    wait_port 10000
    echo "run-local: Azurite blob storage on http://127.0.0.1:10000 (content log; log: .local/azurite-blob.log)"
  fi
fi

backends=$(setting AOAI_BACKENDS)
if [[ "$backends" == *"127.0.0.1:8001"* ]]; then
  mkdir -p .local
  setsid "$PY" -m devkit.simulator --port 8001 --region eastus --api-key sim-key-eastus >.local/sim-eastus.log 2>&1 &
  pids+=($!)
  setsid "$PY" -m devkit.simulator --port 8002 --region westus --api-key sim-key-westus >.local/sim-westus.log 2>&1 &
  pids+=($!)
  wait_port 8001; wait_port 8002
  echo "run-local: simulated AOAI regions eastus on :8001 and westus on :8002"
else
  echo "run-local: using the backends configured in AOAI_BACKENDS"
fi

"$PY" -m usage keys revoke demo >/dev/null 2>&1 || true
key=$("$PY" -m usage keys create --name demo --log-content --json \
  | "$PY" -c "import json,sys; print(json.load(sys.stdin)['key'])")

cat <<MSG

Gateway: http://127.0.0.1:$PORT    demo key (team "demo", a new one each run): $key

Paste into .venv/bin/python (or any Python with the openai package):

from openai import AzureOpenAI
client = AzureOpenAI(azure_endpoint="http://127.0.0.1:$PORT", api_key="$key", api_version="2024-10-21")
for chunk in client.chat.completions.create(model="gpt-4o", stream=True,
                                            messages=[{"role": "user", "content": "Hello"}]):
    print(chunk.choices[0].delta.content or "" if chunk.choices else "", end="", flush=True)

Usage is counted in Table Storage half a second after each request: ".venv/bin/python -m usage report"
shows it (add --format chart for a picture). The demo key logs its prompts and completions (CONTENT_LOG):
".venv/bin/python -m usage content --key demo --format table" reads them a second after each request.
Costs (PRICES in local.settings.json): ".venv/bin/python -m usage statement". Teams see their usage and
cost in a browser at http://127.0.0.1:$PORT/usage (paste the key there).
Ctrl-C stops the gateway, the regions and Azurite.

MSG
"$PY" -m gateway serve --port "$PORT" &
gateway_pid=$!
wait "$gateway_pid"

#!/usr/bin/env bash
# Fuzz Legion's HTTP API from its OpenAPI schema with schemathesis: every operation, valid and
# invalid inputs; fails on any 5xx, undocumented status, wrong content type or response that
# breaks the schema.
#
#   scripts/fuzz.sh                      # starts a throwaway `legion serve` (one agent, an API key)
#   LEGION_URL=http://host:8000 LEGION_API_KEY=... scripts/fuzz.sh   # fuzz a running server
#
# FUZZ_EXAMPLES (default 25) test cases per operation; FUZZ_SEED (default 6) makes runs repeatable.
# The schemathesis report (JUnit XML, NDJSON events) lands in $FUZZ_REPORT_DIR (default: a temp folder).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
ST=${SCHEMATHESIS:-$PWD/.venv/bin/schemathesis}
REPORT_DIR=${FUZZ_REPORT_DIR:-${TMPDIR:-/tmp}/legion-fuzz-report}
EXAMPLES=${FUZZ_EXAMPLES:-25}
SEED=${FUZZ_SEED:-6}
server_pid=""
workdir=""

cleanup() {
  if [[ -n "$server_pid" ]] && kill -0 "$server_pid" 2>/dev/null; then
    kill -INT "$server_pid" && wait "$server_pid" || true
  fi
  [[ -n "$workdir" ]] && rm -rf "$workdir"
}
trap cleanup EXIT

if [[ -z "${LEGION_URL:-}" ]]; then
  workdir=$(mktemp -d)
  port=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  LEGION_API_KEY=$("$PY" -c 'import secrets; print(secrets.token_urlsafe(24))')
  cat >"$workdir/legion.yaml" <<EOF
agents:
  - {name: solo, num_cpus: 1.0, n_parallel: 4, sampling: {max_tokens: 4}}
serve: {port: $port, app_name: fuzz, max_replicas: 1, max_tokens_limit: 8, max_task_chars: 2000}
security: {rate_limit_per_minute: 0}
data_dir: $workdir/data
EOF
  LEGION_API_KEYS="$LEGION_API_KEY" RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled} \
    "$PY" -m legion_cli serve --config "$workdir/legion.yaml" --no-dashboard >"$workdir/serve.log" 2>&1 &
  server_pid=$!
  LEGION_URL="http://127.0.0.1:$port"
  echo "fuzz: started legion serve at $LEGION_URL (log: $workdir/serve.log)"
  for _ in $(seq 300); do
    if curl -fsS "$LEGION_URL/healthz" >/dev/null 2>&1; then break; fi
    kill -0 "$server_pid" 2>/dev/null || { cat "$workdir/serve.log"; exit 1; }
    sleep 1
  done
fi

echo "fuzz: schemathesis against $LEGION_URL/openapi.json ($EXAMPLES examples per operation, seed $SEED)"
status=0
mkdir -p "$REPORT_DIR"
cd "$REPORT_DIR"  # schemathesis keeps a .schemathesis/ cache in its working directory
"$ST" run "$LEGION_URL/openapi.json" \
  --header "Authorization: Bearer ${LEGION_API_KEY:?set LEGION_API_KEY for a running server}" \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance \
  --max-examples "$EXAMPLES" --seed "$SEED" --workers 1 --request-timeout 300 \
  --generation-database none \
  --report junit,ndjson --report-dir . --no-color || status=$?
echo "fuzz: schemathesis exit status $status (report in $REPORT_DIR/)"
exit $status

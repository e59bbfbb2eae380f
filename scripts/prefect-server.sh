#!/usr/bin/env bash
# Start a Prefect server with clipops' server settings (infra/prefect/server.env).
#
#   scripts/prefect-server.sh                          # SQLite in $PREFECT_HOME; UI on :4200
#   scripts/prefect-server.sh --host 127.0.0.1 --port 4300
#
# Arguments go to `prefect server start`. A setting already in the environment wins.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
PREFECT="${PREFECT:-$here/.venv/bin/prefect}"
while IFS='=' read -r key value; do
  case "$key" in '' | \#*) continue ;; esac
  if [ -z "${!key+x}" ]; then export "$key=$value"; fi
done <"$here/infra/prefect/server.env"
exec "$PREFECT" server start "$@"

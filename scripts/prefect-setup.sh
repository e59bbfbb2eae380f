#!/usr/bin/env bash
# Create the clipops process work pool and register every deployment of prefect.yaml.
#
#   scripts/prefect-setup.sh                      # against $PREFECT_API_URL (or the local profile)
#   scripts/prefect-setup.sh --name pretrain/vit-l14   # one deployment only
#
# Extra arguments go to `prefect deploy` (default: --all). Then start a worker in this checkout:
#   CLIPOPS_HOME=$PWD .venv/bin/prefect worker start --pool clipops-process
set -euo pipefail
cd "$(dirname "$0")/.."
PREFECT="${PREFECT:-.venv/bin/prefect}"
POOL=clipops-process  # the work pool named in prefect.yaml
export CLIPOPS_HOME="${CLIPOPS_HOME:-$PWD}"  # baked into the deployments' job variables

"$PREFECT" --no-prompt work-pool create "$POOL" --type process --overwrite
if [ "$#" -eq 0 ]; then set -- --all; fi
"$PREFECT" --no-prompt deploy "$@"
echo "work pool $POOL ready; start a worker with:"
echo "  CLIPOPS_HOME=$CLIPOPS_HOME $PREFECT worker start --pool $POOL"

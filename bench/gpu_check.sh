#!/usr/bin/env bash
# The GPU check of issue 21 (point 6), one command, under 8 minutes on one H100/H200:
#   1. the CUDA tests: pytest on tests/test_train_cuda.py (bf16 and fp16 + GradScaler steps,
#      torch.compile against eager, check_device on the real GPU) and
#      tests/test_train_device_check.py (the arch rules with faked capabilities);
#   2. python -m bench.gpu_check: the measured bf16 matmul peak, ViT-B/32 training pairs/s and
#      MFU at per-GPU batch 256 and 512, compile off and on, and one JSON with all of it and
#      the tests' summary.
# Without CUDA each GPU part prints one "gpu_check: no CUDA device ... skipping" line, the
# JSON is still written ("cuda": false) and the exit status is 0.
#
# Usage: bash bench/gpu_check.sh [OUT.json] [bench.gpu_check options, e.g. --cpu-smoke]
#   JSON: OUT.json or --out, else $OUT/gpu_check.json when $OUT is set, else
#   bench/results/gpu_check.json.
# Environment: PYTHON (default .venv/bin/python, else python3), GPU_CHECK_BUDGET_S (whole
# run, default 460), GPU_CHECK_TEST_BUDGET_S (the pytest part, default 180).
# Exit status: 0 when every part that ran passed; 1 when a test or a measurement failed;
# 2 for bad options; 3 when the budget ran out (the JSON keeps what was measured).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
py=${PYTHON:-.venv/bin/python}
[[ -x $py ]] || py=$(command -v python3) || { echo "gpu_check: no python found" >&2; exit 2; }
budget=${GPU_CHECK_BUDGET_S:-460}
test_budget=${GPU_CHECK_TEST_BUDGET_S:-180}
start=$SECONDS

args=()
if [[ $# -gt 0 && $1 != -* ]]; then
    args+=(--out "$1")
    shift
fi
args+=("$@")

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

test_rc=0
if "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: CUDA tests (at most ${test_budget} s)"
    timeout -k 15 "$test_budget" "$py" -m pytest -q -p no:cacheprovider \
        tests/test_train_cuda.py tests/test_train_device_check.py \
        --junitxml="$work/cuda-tests.xml"
    test_rc=$?
    args+=(--tests-junit "$work/cuda-tests.xml" --tests-rc "$test_rc")
    if [[ $test_rc -eq 124 || $test_rc -eq 137 ]]; then
        echo "gpu_check: the CUDA tests ran past ${test_budget} s and were stopped"
    fi
else
    echo "gpu_check: no CUDA device (torch.cuda.is_available() is False): skipping the CUDA" \
        "tests (tests/test_train_cuda.py)"
fi

left=$((budget - (SECONDS - start)))
((left < 30)) && left=30
timeout -k 20 "$left" "$py" -m bench.gpu_check "${args[@]}"
rc=$?
if [[ $rc -eq 124 || $rc -eq 137 ]]; then
    echo "gpu_check: the measurements ran past the budget (${budget} s) and were killed"
    rc=3
fi
echo "gpu_check: done in $((SECONDS - start)) s (tests rc ${test_rc}, measurements rc ${rc})"
if [[ $rc -ne 0 ]]; then
    exit "$rc"
fi
[[ $test_rc -eq 0 ]] || exit 1
exit 0

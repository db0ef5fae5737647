#!/usr/bin/env bash
# The GPU check (issues 14, 25): CUDA parity tests, step benchmark, QLoRA memory; one report.
#
#   scripts/gpu_check.sh [--smoke] [--out DIR] [--fresh] [--budget-s S] [--estimate STAGE=S] [STAGE ...]
#
# On the GPU machine, first installs the wheels in $QTUNING_WHEELS (default .whl/, made by
# scripts/gpu_wheels.sh) into $QTUNING_WHEEL_SITE (default /tmp/site) and puts them and this
# repository on PYTHONPATH; then runs benchmarks/gpu_check.py with the same arguments (its
# docstring and benchmarks/gpu/README.md say what it measures). --budget-s counts from this
# script's start, so the install is inside the budget. --smoke (CPU, toy shapes, the test
# suite's run) installs nothing. PYTHON picks the interpreter (default python3).
set -euo pipefail
start_ms="$(date +%s%3N)"
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
WHEELS="${QTUNING_WHEELS:-.whl}"
SITE="${QTUNING_WHEEL_SITE:-/tmp/site}"

smoke=0
for arg in "$@"; do [ "$arg" = "--smoke" ] && smoke=1; done
if [ "$smoke" = 0 ] && ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: no NVIDIA GPU here (nvidia-smi -L fails); --smoke runs the check on CPU at toy shapes" >&2
  exit 1
fi
if [ "$smoke" = 0 ] && compgen -G "$WHEELS/*.whl" >/dev/null; then
  echo "gpu_check: installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $SITE"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$WHEELS"/*.whl
  echo "gpu_check: wheels installed $(( $(date +%s%3N) - start_ms )) ms after this script started"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 AXOLOTL_DO_NOT_TRACK=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
exec "$PYTHON" benchmarks/gpu_check.py --started-at "$((start_ms / 1000)).$(printf %03d $((start_ms % 1000)))" "$@"

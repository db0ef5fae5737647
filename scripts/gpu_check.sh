#!/usr/bin/env bash
# The GPU check (issue 14): CUDA parity tests, step benchmark, QLoRA memory; one report.
#
#   scripts/gpu_check.sh [--smoke] [--out DIR] [--fresh] [parity] [step] [qlora] [all]
#
# On the GPU machine, first installs the wheels in $QTUNING_WHEELS (default .whl/, made by
# scripts/gpu_wheels.sh) into $QTUNING_WHEEL_SITE (default /tmp/site) and puts them and this
# repository on PYTHONPATH; then runs benchmarks/gpu_check.py with the same arguments (its
# docstring and benchmarks/gpu/README.md say what it measures). --smoke (CPU, toy shapes, the
# test suite's run) installs nothing. PYTHON picks the interpreter (default python3).
set -euo pipefail
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
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 AXOLOTL_DO_NOT_TRACK=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
exec "$PYTHON" benchmarks/gpu_check.py "$@"

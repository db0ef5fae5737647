#!/usr/bin/env bash
# Make .venv ready to run the tests: CPU torch 2.13.0 first, then the package with
# its extras. The environment is built once per pyproject.toml (keyed by its hash)
# in $QTUNING_VENV_CACHE (default ~/.cache/qtuning-plugin) and .venv links to it,
# so a fresh clone reuses it; only the package itself is re-installed (editable).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
CACHE="${QTUNING_VENV_CACHE:-$HOME/.cache/qtuning-plugin}"
KEY="$(sha256sum pyproject.toml | cut -c1-16)"
ENV_DIR="$CACHE/venv-$KEY"
EXTRAS="${QTUNING_EXTRAS:-axolotl,dev}"

if [ ! -f "$ENV_DIR/.complete-$EXTRAS" ]; then
  echo "setup: building $ENV_DIR (first run for this pyproject.toml: a few minutes, about 4 on 2 cores)"
  rm -rf "$ENV_DIR"
  mkdir -p "$CACHE"
  "$PYTHON" -m venv "$ENV_DIR"
  "$ENV_DIR/bin/pip" install -q --upgrade pip setuptools wheel
  # The CPU wheel first: anything that depends on torch must find it installed.
  "$ENV_DIR/bin/pip" install -q torch==2.13.0
  "$ENV_DIR/bin/pip" install -q ".[$EXTRAS]"
  "$ENV_DIR/bin/pip" uninstall -q -y qtuning-plugin
  touch "$ENV_DIR/.complete-$EXTRAS"
fi

if [ -e .venv ] && [ ! -L .venv ]; then rm -rf .venv; fi
ln -sfn "$ENV_DIR" .venv
.venv/bin/pip install -q --no-deps --no-build-isolation -e .
.venv/bin/python -c "import torch, qtuning_plugin; print('setup: torch', torch.__version__, '| qtuning_plugin', qtuning_plugin.__version__)"

#!/usr/bin/env bash
# Make a virtual environment ready to run the tests: CPU torch 2.13.0 first, then the package
# with its extras. Each environment is built once per definition (keyed by pyproject.toml and the
# profile below) in $QTUNING_VENV_CACHE (default ~/.cache/qtuning-plugin) and linked into the
# clone, so a fresh clone reuses it; only the package itself is re-installed (editable).
#
#   scripts/setup_venv.sh            .venv: Axolotl 0.19 (Python 3.11) with .[axolotl,dev]
#   scripts/setup_venv.sh newest     .venv-newest: no Axolotl; the newest transformers, TRL and
#                                    peft releases (at least those named below) with .[hf,test]
set -euo pipefail
cd "$(dirname "$0")/.."

PROFILE="${1:-axolotl}"
case "$PROFILE" in
  axolotl)
    LINK=.venv
    EXTRAS="${QTUNING_EXTRAS:-axolotl,dev}"
    PACKAGES=""
    ;;
  newest)
    LINK=.venv-newest
    EXTRAS="hf,test"
    # The newest releases on 2026-12-06; a later build takes whatever is newest then.
    # bitsandbytes: the QLoRA path (Axolotl brings it in the other environments).
    PACKAGES="transformers>=5.25 trl>=1.16 peft>=0.21.2 accelerate datasets bitsandbytes>=0.50"
    ;;
  *)
    echo "usage: $0 [axolotl|newest]" >&2
    exit 2
    ;;
esac

# Python 3.11, the tested release; PYTHON=... picks another interpreter explicitly.
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || {
  echo "setup: $PYTHON not found; install Python 3.11 (or name an interpreter: PYTHON=python3.12 $0 ...)" >&2
  exit 1
}
# the interpreter itself (its path and build) is part of the definition
INTERPRETER="$("$PYTHON" -c 'import os, sys; print(os.path.realpath(sys.executable), sys.version)')"
CACHE="${QTUNING_VENV_CACHE:-$HOME/.cache/qtuning-plugin}"
KEY="$( (cat pyproject.toml; printf '%s\n' "$PROFILE" "$EXTRAS" "$PACKAGES" "$INTERPRETER") | sha256sum | cut -c1-16)"
ENV_DIR="$CACHE/venv-$PROFILE-$KEY"

if [ ! -f "$ENV_DIR/.complete" ]; then
  echo "setup: building $ENV_DIR (first run for this definition: a few minutes, about 4 on 2 cores)"
  rm -rf "$ENV_DIR"
  mkdir -p "$CACHE"
  "$PYTHON" -m venv "$ENV_DIR"
  "$ENV_DIR/bin/pip" install -q --upgrade pip setuptools wheel
  # The CPU wheel first: anything that depends on torch must find it installed.
  "$ENV_DIR/bin/pip" install -q torch==2.13.0
  # shellcheck disable=SC2086  # PACKAGES is a list of requirements
  "$ENV_DIR/bin/pip" install -q ".[$EXTRAS]" $PACKAGES
  "$ENV_DIR/bin/pip" uninstall -q -y qtuning-plugin
  touch "$ENV_DIR/.complete"
fi

if [ -e "$LINK" ] && [ ! -L "$LINK" ]; then rm -rf "$LINK"; fi
ln -sfn "$ENV_DIR" "$LINK"
"$LINK/bin/pip" install -q --no-deps --no-build-isolation -e .
"$LINK/bin/python" -c "import torch, qtuning_plugin; print('setup: torch', torch.__version__, '| qtuning_plugin', qtuning_plugin.__version__)"

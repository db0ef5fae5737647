#!/usr/bin/env bash
# The LLaMA-Factory test environment: LLaMA-Factory 0.9.5 on the host's Python 3.11, CPU torch.
#
#   scripts/llamafactory-env.sh setup          build it if needed (about 5 minutes on 2 cores, 2.2 GB)
#   scripts/llamafactory-env.sh run CMD ...    run CMD in it, from the repository root
#
# A virtual environment cached under $QTUNING_VENV_CACHE (default ~/.cache/qtuning-plugin) as
# llamafactory-venv-<hash of pyproject.toml and the definition below>, holding the CPU build of
# torch, LLaMA-Factory with its own pins (transformers, peft, trl, accelerate, datasets), this
# package's `[llamafactory]` extra, pytest and pytest-xdist; this repository is installed editable.
# Python 3.11 (the host's `python3.11`, or the interpreter PYTHON names): without it, an error.
#
# CPU only, and only here: PyPI's torchvision and torchaudio wheels are CUDA builds, linked
# against libtorch_cuda, and do not load on the CPU torch ("operator torchvision::nms does not
# exist", "Could not load this library: .../_torchaudio.so"). Both are removed after the
# install: transformers then treats them as absent. LLaMA-Factory's `data/mm_plugin.py` imports
# torchaudio unconditionally (it loads audio files with it), so `import torchaudio` must still
# succeed: a placeholder module takes its place, and any use of it raises an ImportError that
# says why. Text-only SFT never uses it. A user on CUDA installs LLaMA-Factory as its README
# says and gets the real packages.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd -P)"
cd "$REPO"

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || {
  echo "llamafactory-env: $PYTHON not found; install Python 3.11 (or name an interpreter: PYTHON=python3.12 $0 ...)" >&2
  exit 1
}
TORCH="torch==2.13.0"
LLAMAFACTORY="llamafactory==0.9.5"
TEST_TOOLS="pytest>=8 pytest-xdist>=3.8"
CUDA_ONLY_WHEELS="torchvision torchaudio"
TORCHAUDIO_PLACEHOLDER='"""Placeholder for torchaudio in the CPU test environment of qtuning-plugin (scripts/llamafactory-env.sh).

PyPI'"'"'s torchaudio wheels are CUDA builds that do not load on a CPU torch; LLaMA-Factory imports
torchaudio unconditionally but uses it only to read audio files.
"""


def __getattr__(name):
    raise ImportError(
        f"torchaudio.{name}: torchaudio is not installed in this CPU test environment "
        "(scripts/llamafactory-env.sh); audio datasets need the real torchaudio"
    )
'

CACHE="${QTUNING_VENV_CACHE:-$HOME/.cache/qtuning-plugin}"
# the interpreter itself (its path and build) is part of the definition
INTERPRETER="$("$PYTHON" -c 'import os, sys; print(os.path.realpath(sys.executable), sys.version)')"
DEFINITION=("$INTERPRETER" "$TORCH" "$LLAMAFACTORY" "$TEST_TOOLS" "$CUDA_ONLY_WHEELS" "$TORCHAUDIO_PLACEHOLDER")
KEY="$( (cat pyproject.toml; printf '%s\n' "${DEFINITION[@]}") | sha256sum | cut -c1-16)"
ENV_DIR="$CACHE/llamafactory-venv-$KEY"

log() { echo "llamafactory-env: $*" >&2; }

build() {
  local site start=$SECONDS
  log "building $ENV_DIR: $TORCH, $LLAMAFACTORY, .[llamafactory], $TEST_TOOLS"
  rm -rf "$ENV_DIR"
  "$PYTHON" -m venv "$ENV_DIR"
  "$ENV_DIR/bin/pip" install -q --upgrade pip setuptools wheel
  # The CPU wheel first, and pinned again on the same line as LLaMA-Factory: without the pin,
  # pip resolves LLaMA-Factory's torch/torchaudio requirements to another (CUDA) torch.
  "$ENV_DIR/bin/pip" install -q "$TORCH"
  # shellcheck disable=SC2086  # TEST_TOOLS is a list of requirements
  "$ENV_DIR/bin/pip" install -q "$TORCH" "$LLAMAFACTORY" ".[llamafactory]" $TEST_TOOLS
  "$ENV_DIR/bin/pip" uninstall -q -y qtuning-plugin $CUDA_ONLY_WHEELS
  site="$("$ENV_DIR/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  mkdir -p "$site/torchaudio"
  printf '%s' "$TORCHAUDIO_PLACEHOLDER" >"$site/torchaudio/__init__.py"
  touch "$ENV_DIR/.complete"
  log "built in $((SECONDS - start)) s"
}

setup() {
  mkdir -p "$CACHE"
  exec 9>"$CACHE/llamafactory-env.lock"
  flock 9  # one build at a time per cache
  [ -f "$ENV_DIR/.complete" ] || build
  # this clone, editable (console scripts included); redone when another clone installed its own
  if ! grep -qs "\"file://$REPO\"" "$ENV_DIR"/lib/python3*/site-packages/qtuning_plugin-*.dist-info/direct_url.json; then
    "$ENV_DIR/bin/pip" install -q --no-deps --no-build-isolation -e .
  fi
  exec 9>&-
}

case "${1:-}" in
  setup)
    setup
    "$ENV_DIR/bin/python" -c "import torch, llamafactory, qtuning_plugin; print('llamafactory-env: torch', torch.__version__, '| llamafactory', llamafactory.__version__)"
    ;;
  run)
    shift
    [ $# -gt 0 ] || { log "usage: $0 run CMD [ARG...]"; exit 2; }
    setup
    PATH="$ENV_DIR/bin:$PATH" VIRTUAL_ENV="$ENV_DIR" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
      TOKENIZERS_PARALLELISM=false exec "$@"
    ;;
  *)
    echo "usage: $0 setup | run CMD [ARG...]" >&2
    exit 2
    ;;
esac

#!/usr/bin/env bash
# The "latest" test environment: the newest Axolotl release (0.21.0) on Python 3.13.
#
#   scripts/latest-env.sh setup          build it if needed (about 7 minutes on 2 cores, 8 GB)
#   scripts/latest-env.sh run CMD ...    run CMD in it, from the repository root
#
# Route: a Debian trixie root (debootstrap --variant=minbase from the apt mirror this
# machine already uses) with Debian's prebuilt python3.13, entered with chroot. Trixie's
# packages need its newer glibc, so they cannot be unpacked onto a bookworm host; the other
# route, compiling CPython from Debian's source package, would install its whole
# build-dependency tree on the host and compile for far longer on 2 cores. The root takes
# about two minutes (debootstrap, then apt install python3.13-venv python3-dev
# build-essential), needs no compiler on the host, and changes nothing outside the cache
# folder but installing debootstrap.
# Each command runs in a private mount namespace (unshare --mount) with /proc, /sys,
# /dev and the paths below bound in at their host paths, so nothing stays mounted
# after it exits and the root can be deleted with rm -rf:
#   - the repository and /tmp (so `run axolotl train /tmp/x/cfg.yml` works),
#   - /etc/hosts and /etc/resolv.conf (torchrun hangs without the host name),
#   - pip's configuration and the local indexes, certificates and download cache it names,
#   - the host's model cache (qtuning_plugin/smollm2.py: $QTUNING_MODEL_CACHE, default models/
#     in $QTUNING_VENV_CACHE or ~/.cache/qtuning-plugin), named to the command by
#     QTUNING_MODEL_CACHE: both suites share one converted SmolLM2 folder.
# The command gets the caller's environment less PATH, PYTHONPATH, LD_* and the like, plus
# HF_HUB_OFFLINE=1 AXOLOTL_DO_NOT_TRACK=1.
# Needs root (CI runs as root), and debootstrap, which it installs with apt-get if missing.
#
# The root is cached under $QTUNING_LATEST_CACHE (default: $QTUNING_VENV_CACHE, else
# ~/.cache/qtuning-plugin) as latest-root-<hash of the OS definition below>; inside it,
# the virtualenv /opt/qtuning/venv-<hash of pyproject.toml and the pins below> holds
# PyPI's torch (the CUDA build for cp313: it runs on CPU), Axolotl and `.[axolotl,dev]`,
# and this repository installed editable.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd -P)"
SCRIPT="$REPO/scripts/latest-env.sh"

SUITE=trixie
APT_PACKAGES="python3.13-venv python3-dev build-essential"
PYTHON=python3.13
TORCH="torch==2.13.0"
AXOLOTL="axolotl==0.21.0"
# zstandard (an Axolotl dependency) has no cp313 wheel before 0.23 and its pinned build
# dependency does not compile on 3.13: build 0.22.0 against an installed cffi instead.
PREBUILD="zstandard==0.22.0"

CACHE="${QTUNING_LATEST_CACHE:-${QTUNING_VENV_CACHE:-$HOME/.cache/qtuning-plugin}}"
OS_KEY="$(printf '%s\n' "$SUITE" "$APT_PACKAGES" | sha256sum | cut -c1-16)"
ROOT="$CACHE/latest-root-$OS_KEY"
VENV_KEY="$( (cat "$REPO/pyproject.toml"; printf '%s\n' "$PYTHON" "$TORCH" "$AXOLOTL" "$PREBUILD") | sha256sum | cut -c1-16)"
VENV="/opt/qtuning/venv-$VENV_KEY"  # a path inside the root
MODEL_CACHE="${QTUNING_MODEL_CACHE:-${QTUNING_VENV_CACHE:-$HOME/.cache/qtuning-plugin}/models}"

log() { echo "latest-env: $*" >&2; }

debian_mirror() {
  # the first Debian archive (not -security) named in apt's sources
  local mirror
  mirror="$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null |
    grep -v '^[[:space:]]*#' | grep -oE 'https?://[^ ]+/debian/?' | grep -v security | head -n1 || true)"
  echo "${QTUNING_DEBIAN_MIRROR:-${mirror:-http://deb.debian.org/debian}}"
}

host_pip_paths() {
  # absolute paths named in pip's configuration (config files, local indexes, find-links,
  # certificates), the config files themselves, and pip's download cache
  local path
  for path in /etc/pip.conf /etc/xdg/pip/pip.conf "$HOME/.pip/pip.conf" "$HOME/.config/pip/pip.conf" \
    ${PIP_CONFIG_FILE:-} ${SSL_CERT_FILE:-} ${REQUESTS_CA_BUNDLE:-} "${PIP_CACHE_DIR:-$HOME/.cache/pip}"; do
    echo "$path"
  done
  # a file:// index (.../simple) links its files as ../../files: bind the folder above it
  python3 -m pip config list 2>/dev/null | grep -oE "='[^']*'" | tr -d "='" | tr ' ' '\n' |
    sed -n 's#^file://\(/.*\)/simple/*$#\1#; \#^/#p'
}

bind_same_path() {  # bind_same_path HOST_PATH: visible inside the root at the same path
  local src="$1" dst="$ROOT$1"
  [ -e "$src" ] || return 0
  if [ -d "$src" ]; then mkdir -p "$dst"; else mkdir -p "$(dirname "$dst")" && touch "$dst"; fi
  mount --rbind "$src" "$dst"
}

in_namespace() {  # in_namespace CMD...: (inside unshare) mount, chroot, run CMD from the repository
  local path workdir=/
  mount --rbind /proc "$ROOT/proc"
  mount --rbind /sys "$ROOT/sys"
  mount --rbind /dev "$ROOT/dev"
  bind_same_path /etc/hosts
  bind_same_path /etc/resolv.conf
  if [ -z "${QTUNING_LATEST_BARE:-}" ]; then  # not while apt builds the root: it owns the certificates
    mkdir -p "$MODEL_CACHE"
    for path in /tmp "$REPO" "$MODEL_CACHE" $(host_pip_paths | sort -u); do
      bind_same_path "$path"
    done
    workdir="$REPO"
  fi
  local keep=() name
  # the caller's environment, less what points into the host's software
  while IFS='=' read -r name _; do
    case "$name" in
      PATH | LD_LIBRARY_PATH | LD_PRELOAD | PYTHONHOME | PYTHONPATH | VIRTUAL_ENV | PYENV* | CONDA* | "") ;;
      *) keep+=("$name=${!name}") ;;
    esac
  done < <(env -0 | tr '\0' '\n' | grep -E '^[A-Za-z_][A-Za-z0-9_]*=')
  exec chroot "$ROOT" /usr/bin/env -i "${keep[@]}" \
    HOME=/root LANG=C.UTF-8 VIRTUAL_ENV="$VENV" DEBIAN_FRONTEND=noninteractive \
    PATH="$VENV/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    HF_HUB_OFFLINE=1 AXOLOTL_DO_NOT_TRACK=1 QTUNING_MODEL_CACHE="$MODEL_CACHE" \
    /bin/bash -c 'cd "$0" && exec "$@"' "$workdir" "$@"
}

enter() {  # enter CMD...: run CMD inside the root, nothing left mounted afterwards
  unshare --mount --propagation private -- env QTUNING_LATEST_ROOT="$ROOT" QTUNING_LATEST_BARE="${QTUNING_LATEST_BARE:-}" bash "$SCRIPT" __in-namespace "$@"
}

build_root() {
  local mirror partial="$ROOT.partial"
  command -v debootstrap >/dev/null || {
    log "installing debootstrap"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q debootstrap >/dev/null || { apt-get update -q && apt-get install -y -q debootstrap; }
  }
  mirror="$(debian_mirror)"
  log "building $ROOT: debootstrap $SUITE from $mirror, then apt-get install $APT_PACKAGES"
  rm -rf "$partial"
  mkdir -p "$CACHE"
  # its own mount namespace: debootstrap mounts /proc in the target and must not leave it behind
  unshare --mount --propagation private -- debootstrap --variant=minbase "$SUITE" "$partial" "$mirror" >"$CACHE/debootstrap.log" 2>&1 ||
    { tail -n 30 "$CACHE/debootstrap.log" >&2; exit 1; }
  ROOT="$partial" QTUNING_LATEST_BARE=1 enter bash -c "apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $APT_PACKAGES >/dev/null && apt-get clean"
  mv "$partial" "$ROOT"
}

build_venv() {
  log "building $VENV in the root: $TORCH, $AXOLOTL, .[axolotl,dev]"
  enter bash -euo pipefail -c "
    rm -rf '$VENV'
    $PYTHON -m venv '$VENV'
    pip install -q --upgrade pip setuptools wheel
    pip install -q '$TORCH'
    pip install -q cffi
    pip install -q --no-build-isolation '$PREBUILD'
    pip install -q '.[axolotl,dev]' '$AXOLOTL'
    pip uninstall -q -y qtuning-plugin
    touch '$VENV/.complete'"
}

setup() {
  [ "$(id -u)" = 0 ] || { log "needs root (chroot and mounts); run it with sudo"; exit 1; }
  mkdir -p "$CACHE"
  exec 9>"$CACHE/latest-env.lock"
  flock 9  # one build at a time per cache
  [ -f "$ROOT/usr/bin/$PYTHON" ] || build_root
  [ -f "$ROOT$VENV/.complete" ] || build_venv
  # this clone, editable (entry points included); redone when another clone installed its own
  if ! grep -qs "\"file://$REPO\"" "$ROOT$VENV"/lib/$PYTHON/site-packages/qtuning_plugin-*.dist-info/direct_url.json; then
    enter pip install -q --no-deps --no-build-isolation -e .
  fi
  exec 9>&-
}

case "${1:-}" in
  __in-namespace)
    shift
    ROOT="$QTUNING_LATEST_ROOT"
    in_namespace "$@"
    ;;
  setup)
    setup
    enter python -c "import sys, torch, axolotl, qtuning_plugin; print('latest-env: Python', sys.version.split()[0], '| torch', torch.__version__, '| axolotl', axolotl.__version__)"
    ;;
  run)
    shift
    [ $# -gt 0 ] || { log "usage: $0 run CMD [ARG...]"; exit 2; }
    setup
    enter "$@"
    ;;
  *)
    echo "usage: $0 setup | run CMD [ARG...]" >&2
    exit 2
    ;;
esac

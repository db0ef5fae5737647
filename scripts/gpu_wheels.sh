#!/usr/bin/env bash
# Download the wheels that the GPU check (scripts/gpu_check.sh) installs on the lent GPU machine
# into .whl/ (or $QTUNING_WHEELS), and keep that folder out of git (.git/info/exclude).
#
# That machine runs Python 3.12 on manylinux x86_64 with torch 2.11, transformers 5.17, peft,
# accelerate, triton 3.6, numpy, packaging, pytest and PyYAML installed, and reaches no network.
# It lacks, so these travel (exact versions; each one's Requires-Dist is checked below):
#   liger-kernel 0.8.5, bitsandbytes 0.50.2 (needs torch, numpy, packaging: there);
#   pydantic 2.12.5 with pydantic-core, annotated-types, typing-inspection (the versions the
#   test venv has), for qtuning_plugin.config, and typing-extensions: pydantic-core wants
#   >= 4.14.1, newer than the machine may have.
# Not carried: axolotl (the check does not use it) and liger-kernel's cutedsl extra (its
# nvidia-cutlass-dsl-libs-cu13 wheel alone is 92 MB; one device call carries 64 MiB in all).
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS="${QTUNING_WHEELS:-.whl}"
PYTHON="${PYTHON:-python3}"
PINS=(
  liger-kernel==0.8.5
  bitsandbytes==0.50.2
  pydantic==2.12.5
  pydantic-core==2.41.5
  annotated-types==0.8.0
  typing-inspection==0.4.5
  typing-extensions==4.15.0
)
ON_DEVICE="torch triton numpy packaging"  # what the carried wheels may need from the machine
LIMIT_MIB=60  # of the 64 MiB a call carries, with room for the repository itself (about 1 MiB)

mkdir -p "$WHEELS"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$WHEELS" "${PINS[@]}"

case "$WHEELS" in
  /* | ../*) ;;  # outside the repository: nothing to exclude
  *)
    exclude="$(git rev-parse --git-path info/exclude)"
    mkdir -p "$(dirname "$exclude")"
    grep -qxF "/${WHEELS%/}/" "$exclude" 2>/dev/null || echo "/${WHEELS%/}/" >>"$exclude"
    ;;
esac

# One wheel per pinned distribution and nothing else; every requirement carried or on the machine;
# the folder under the limit.
"$PYTHON" - "$WHEELS" "$LIMIT_MIB" "$ON_DEVICE" "${PINS[@]}" <<'EOF'
import re
import sys
import zipfile
from pathlib import Path

folder, limit_mib, on_device, pins = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3].split(), sys.argv[4:]


def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


wanted = {canonical(pin.split("==")[0]): pin.split("==")[1] for pin in pins}
wheels = sorted(folder.glob("*.whl"))
found = {}
for wheel in wheels:
    name, version = wheel.name.split("-")[:2]
    found.setdefault(canonical(name), []).append((version, wheel))
problems = [f"{name}: {len(found.get(name, []))} wheels, want one of {version}" for name, version in wanted.items()
            if [v for v, _ in found.get(name, [])] != [version]]
problems += [f"{name}: not pinned here, remove {w.name}" for name in found if name not in wanted for _, w in found[name]]
available = set(wanted) | {canonical(name) for name in on_device}
for name, entries in found.items():
    with zipfile.ZipFile(entries[0][1]) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        requires = [line.split(":", 1)[1].strip() for line in archive.read(metadata).decode().splitlines()
                    if line.startswith("Requires-Dist:")]
    for requirement in requires:
        if "extra ==" in requirement or 'python_version < "3' in requirement:
            continue
        needed = canonical(re.match(r"[A-Za-z0-9_.-]+", requirement).group())
        if needed not in available:
            problems.append(f"{name} requires {requirement}: neither carried nor on the machine")
total = sum(w.stat().st_size for w in wheels) / 2**20
for wheel in wheels:
    print(f"{wheel.stat().st_size / 2**20:7.2f} MiB  {wheel.name}")
print(f"{total:7.2f} MiB  in {folder}/ (limit {limit_mib:.0f} MiB)")
if total > limit_mib:
    problems.append(f"{total:.1f} MiB of wheels, over {limit_mib:.0f} MiB")
if problems:
    sys.exit("gpu_wheels: " + "; ".join(problems))
EOF

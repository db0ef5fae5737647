#!/usr/bin/env bash
# Download the wheels that the GPU check (scripts/gpu_check.sh) installs on the lent GPU machine
# into .whl/ (or $QTUNING_WHEELS), and keep that folder out of git (.git/info/exclude).
#
# That machine (benchmarks/gpu/README.md) runs Python 3.12.3 on manylinux x86_64 with torch 2.11.0,
# transformers 5.17.0, peft, accelerate, triton 3.6.0, numpy 2.5.2, packaging, pytest, PyYAML and
# safetensors installed, and reaches no network. It lacks, so these travel (exact versions):
#   liger-kernel 0.8.5 (needs torch >= 2.1.2, triton >= 2.3.1: there), bitsandbytes 0.50.2 (needs
#   torch >= 2.4, < 3, numpy >= 1.17, packaging >= 20.9: there); pydantic 2.12.5 with pydantic-core,
#   annotated-types, typing-inspection (the versions the test venv has), for qtuning_plugin.config,
#   and typing-extensions: pydantic-core wants >= 4.14.1, newer than the machine may have.
# The check below reads every wheel's Requires-Python and Requires-Dist, evaluates their markers
# for that Python, and checks each requirement against the carried version or the machine's.
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
# What the carried wheels may need from the machine, with its version where known (KINDS.md of the device tool).
ON_DEVICE="torch==2.11.0 triton==3.6.0 numpy==2.5.2 packaging"
DEVICE_PYTHON=3.12.3
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
"$PYTHON" - "$WHEELS" "$LIMIT_MIB" "$DEVICE_PYTHON" "$ON_DEVICE" "${PINS[@]}" <<'EOF'
import re
import sys
import zipfile
from pathlib import Path

try:
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
except ImportError:  # pip's own copy
    from pip._vendor.packaging.markers import default_environment
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.specifiers import SpecifierSet

folder, limit_mib, python = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
on_device, pins = sys.argv[4].split(), sys.argv[5:]
device = {**default_environment(), "python_version": python.rsplit(".", 1)[0], "python_full_version": python,
          "implementation_name": "cpython", "platform_python_implementation": "CPython", "sys_platform": "linux",
          "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix", "extra": ""}


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
# name -> version (None: on the machine, version unknown)
available = {**{canonical(pin.split("==")[0]): (pin.split("==")[1] if "==" in pin else None) for pin in on_device},
             **wanted}
for name, entries in found.items():
    with zipfile.ZipFile(entries[0][1]) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        lines = archive.read(metadata).decode().splitlines()
    requires_python = [line.split(":", 1)[1].strip() for line in lines if line.startswith("Requires-Python:")]
    if requires_python and python not in SpecifierSet(requires_python[0]):
        problems.append(f"{name} requires Python {requires_python[0]}, the machine has {python}")
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        requirement = Requirement(line.split(":", 1)[1].strip())
        if requirement.marker is not None and not requirement.marker.evaluate(device):
            continue  # an extra, or another Python or platform
        needed = canonical(requirement.name)
        if needed not in available:
            problems.append(f"{name} requires {requirement}: neither carried nor on the machine")
        elif available[needed] is not None and available[needed] not in requirement.specifier:
            problems.append(f"{name} requires {requirement}: the machine would have {needed} {available[needed]}")
total = sum(w.stat().st_size for w in wheels) / 2**20
for wheel in wheels:
    print(f"{wheel.stat().st_size / 2**20:7.2f} MiB  {wheel.name}")
print(f"{total:7.2f} MiB  in {folder}/ (limit {limit_mib:.0f} MiB)")
if total > limit_mib:
    problems.append(f"{total:.1f} MiB of wheels, over {limit_mib:.0f} MiB")
if problems:
    sys.exit("gpu_wheels: " + "; ".join(problems))
EOF

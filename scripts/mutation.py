"""`make mutation`: plant small bugs one at a time and check that the unit tests catch each.

The bugs are listed in ``scripts/mutants.toml``: for each, the file, an exact snippet of it, its
replacement and the test modules that must catch it. The runner copies the working tree (tracked
and untracked, not ignored, files) into a temporary folder, runs every named test module there
once unmutated (a failing baseline would make every mutant look caught), then for each mutant
replaces the snippet in the copy, runs its test modules with ``-x`` and restores the file. The
working tree is never written.

A mutant is caught when pytest fails (exit status 1) or cannot collect the tests (2, e.g. an
import error), or when it runs past the time limit. A snippet that does not occur exactly once,
a replacement that is not valid Python, or a test module that does not exist is an error.
The exit status is 0 only when every mutant was caught and nothing was in error.

    python scripts/mutation.py [-k SUBSTRING] [--check] [--no-baseline] [--timeout SECONDS]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MUTANTS = REPO / "scripts" / "mutants.toml"


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    original: str
    replacement: str
    tests: tuple[str, ...]


def load_mutants(path: Path = MUTANTS) -> list[Mutant]:
    with open(path, "rb") as handle:
        entries = tomllib.load(handle)["mutant"]
    return [
        Mutant(entry["name"], entry["file"], entry["original"], entry["replacement"], tuple(entry["tests"]))
        for entry in entries
    ]


def problems(mutant: Mutant, tree: Path) -> list[str]:
    """Why ``mutant`` cannot be planted in ``tree`` (empty if it can)."""
    found = []
    source = tree / mutant.file
    if not source.is_file():
        return [f"{mutant.file} does not exist"]
    count = source.read_text(encoding="utf-8").count(mutant.original)
    if count != 1:
        found.append(f"its snippet occurs {count} times in {mutant.file} (must be exactly once)")
    if mutant.original == mutant.replacement:
        found.append("its replacement is its snippet")
    found += [f"test module {test} does not exist" for test in mutant.tests if not (tree / test).is_file()]
    if not found:
        mutated = source.read_text(encoding="utf-8").replace(mutant.original, mutant.replacement)
        try:
            compile(mutated, str(source), "exec")
        except SyntaxError as error:
            found.append(f"the mutated file is not valid Python: {error}")
    return found


def copy_tree(destination: Path) -> None:
    """Copy the working tree's tracked and untracked (not ignored) files into ``destination``."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout.decode().split("\0")
    for name in filter(None, listed):
        source, target = REPO / name, destination / name
        if source.is_symlink():  # qtuning_plugin/examples -> ../examples
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(os.readlink(source))
        elif source.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def pytest(tree: Path, tests: tuple[str, ...], timeout: float) -> tuple[int, str]:
    """Run the test modules in ``tree`` (its package first on the path); ``(status, output tail)``,
    status None when the time limit was reached."""
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "AXOLOTL_DO_NOT_TRACK": "1"}
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    try:
        proc = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, ""
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    return proc.returncode, lines[-1] if lines else ""


def check_imports_from(tree: Path) -> None:
    """The copy's package must be the one the tests import (PYTHONPATH before the editable install)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    found = subprocess.run(
        [sys.executable, "-c", "import qtuning_plugin; print(qtuning_plugin.__file__)"],
        cwd=tree, env=env, capture_output=True, text=True, check=True,
    ).stdout.strip()
    if not Path(found).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"mutation: the tests would import {found}, not the copy in {tree}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", dest="select", default="", help="only the mutants whose name contains this")
    parser.add_argument("--check", action="store_true", help="only check that every mutant can be planted")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the test modules")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per test run (a mutant past it is caught)")
    args = parser.parse_args(argv)

    mutants = [m for m in load_mutants() if args.select in m.name]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qtuning-mutation-") as folder:
        tree = Path(folder)
        copy_tree(tree)
        check_imports_from(tree)
        errors = {m.name: problems(m, tree) for m in mutants}
        errors = {name: found for name, found in errors.items() if found}
        for name, found in errors.items():
            print(f"ERROR     {name}: {'; '.join(found)}", flush=True)
        runnable = [m for m in mutants if m.name not in errors]
        if args.check:
            print(f"mutation: {len(runnable)} of {len(mutants)} mutants can be planted")
            return 1 if errors else 0

        if not args.no_baseline:
            modules = tuple(sorted({test for m in runnable for test in m.tests}))
            status, tail = pytest(tree, modules, args.timeout * 2)
            if status != 0:
                print(f"mutation: the unmutated tests fail ({status}): {tail}")
                return 2
            print(f"baseline  {len(modules)} test modules pass unmutated ({tail})", flush=True)

        survived = []
        for mutant in runnable:
            path = tree / mutant.file
            pristine = path.read_text(encoding="utf-8")
            path.write_text(pristine.replace(mutant.original, mutant.replacement), encoding="utf-8")
            began = time.perf_counter()
            try:
                status, tail = pytest(tree, mutant.tests, args.timeout)
            finally:
                path.write_text(pristine, encoding="utf-8")
            took = time.perf_counter() - began
            if status is None:
                verdict = f"caught    {mutant.name} (time limit of {args.timeout:.0f} s)"
            elif status in (1, 2):
                verdict = f"caught    {mutant.name} ({took:.0f} s: {tail})"
            elif status == 0:
                verdict = f"SURVIVED  {mutant.name} ({took:.0f} s; {' '.join(mutant.tests)} pass with it)"
                survived.append(mutant.name)
            else:
                verdict = f"ERROR     {mutant.name}: pytest exited with {status}: {tail}"
                errors[mutant.name] = [tail]
            print(verdict, flush=True)

    caught = len(runnable) - len(survived) - sum(1 for m in runnable if m.name in errors)
    minutes = (time.perf_counter() - start) / 60
    print(
        f"\nmutation: {caught} of {len(mutants)} planted bugs caught, {len(survived)} survived, "
        f"{len(errors)} in error ({minutes:.1f} min)"
    )
    return 0 if not survived and not errors else 1


if __name__ == "__main__":
    sys.exit(main())

"""CI's rule for skips (the repository's top ``conftest.py``): with ``CI=true``, a test that skips
for want of a module named in ``QTUNING_ENV_PACKAGES`` fails, naming it; any other skip stays a
skip. Each case runs a child pytest on a test file written here, beside a copy of that conftest."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.env_independent

ROOT_CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"
ABSENT = "qtuning_absent_module"

IN_A_TEST = f"""
import pytest

def test_needs_it():
    pytest.importorskip("{ABSENT}")

@pytest.mark.skipif(True, reason="{ABSENT} is not installed (an extra)")
def test_marked():
    pass

def test_other_reason():
    pytest.skip("needs CUDA")
"""
AT_IMPORT = f"""
import pytest

pytest.importorskip("{ABSENT}")

def test_never_runs():
    pass
"""


def run_child(tmp_path: Path, source: str, **env: str) -> subprocess.CompletedProcess:
    shutil.copy(ROOT_CONFTEST, tmp_path / "conftest.py")
    (tmp_path / "test_case.py").write_text(source, encoding="utf-8")
    child_env = {key: value for key, value in os.environ.items() if key not in ("CI", "QTUNING_ENV_PACKAGES")}
    child_env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"  # a bare pytest starts in a fraction of the time
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "test_case.py"]
    return subprocess.run(
        command, cwd=tmp_path, env={**child_env, **env}, capture_output=True, text=True, timeout=120
    )


def test_in_ci_a_missing_package_the_environment_is_meant_to_have_fails_naming_it(tmp_path):
    proc = run_child(tmp_path, IN_A_TEST, CI="true", QTUNING_ENV_PACKAGES=f"torch {ABSENT}")
    assert proc.returncode == 1, proc.stdout
    # importorskip's skip in the test fails it; the skipif mark's, at set-up, is an error there
    assert "1 failed, 1 skipped" in proc.stdout and "1 error" in proc.stdout, proc.stdout
    message = f"CI=true: {ABSENT} is missing from this test environment, which is meant to have it"
    assert proc.stdout.count(message) == 2, proc.stdout
    assert "needs CUDA" in proc.stdout  # a skip for another reason stays one


@pytest.mark.parametrize(
    "env",
    [{"QTUNING_ENV_PACKAGES": ABSENT}, {"CI": "true", "QTUNING_ENV_PACKAGES": "torch"}, {"CI": "true"}],
    ids=["not-in-ci", "not-meant-to-have-it", "no-list"],
)
def test_otherwise_it_skips(tmp_path, env):
    proc = run_child(tmp_path, IN_A_TEST, **env)
    assert proc.returncode == 0 and "3 skipped" in proc.stdout, proc.stdout


def test_in_ci_a_module_that_skips_at_import_is_an_error(tmp_path):
    proc = run_child(tmp_path, AT_IMPORT, CI="true", QTUNING_ENV_PACKAGES=ABSENT)
    assert proc.returncode != 0, proc.stdout
    assert "1 error" in proc.stdout and f"CI=true: {ABSENT} is missing" in proc.stdout, proc.stdout
    assert run_child(tmp_path, AT_IMPORT, QTUNING_ENV_PACKAGES=ABSENT).returncode == 5  # no CI: skipped, nothing ran

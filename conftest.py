"""For every suite (tests/, integration_tests/, llamafactory_tests/): the tiny model shared by a
session, and CI's rule that a test environment's own packages are never skipped away.

(``tests/conftest.py`` holds the fixtures of the in-process tests; its test modules import it
as ``conftest``, which is why nothing here is imported by name.)

**A missing package in CI is a failure.** A test that needs an optional package skips where it
is not installed, with a reason that names the module in one of two forms:
``pytest.importorskip("X")``'s ``could not import 'X'``, or ``X is not installed``. With
``CI=true``, such a skip of a module named in ``QTUNING_ENV_PACKAGES`` (the packages the test
environment is meant to have, set for each suite by the Makefile) fails instead, naming it: a
broken environment shows as a failure, not as a changed skip count.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ENV_PACKAGES = "QTUNING_ENV_PACKAGES"
# The two forms of a skip for a missing module: pytest.importorskip's, and ours.
MISSING_MODULE = re.compile(r"could not import '(?P<imported>[\w.]+)'|^(?P<named>[A-Za-z_][\w.]*) is not installed")


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "env_independent: runs in `make test`'s environment only, not again in the others: it uses "
        "only torch, pydantic and Python, or checks tooling that runs in that environment",
    )


def meant_to_have() -> set[str]:
    """The modules this test environment is meant to have, where CI=true (else none)."""
    if os.environ.get("CI") != "true":
        return set()
    return set(os.environ.get(ENV_PACKAGES, "").split())


def skip_reason(report) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return reason.removeprefix("Skipped: ")


def missing_package(report) -> str | None:
    """The module whose absence made ``report`` skip, if this environment is meant to have it."""
    if not report.skipped or hasattr(report, "wasxfail"):
        return None
    match = MISSING_MODULE.search(skip_reason(report))
    if match is None:
        return None
    module = match.group("imported") or match.group("named")
    return module if module.split(".")[0] in meant_to_have() else None


def fail_for_missing_package(report) -> None:
    module = missing_package(report)
    if module is not None:
        report.outcome = "failed"
        report.longrepr = (
            f"CI=true: {module} is missing from this test environment, which is meant to have it "
            f"({ENV_PACKAGES}={os.environ.get(ENV_PACKAGES, '')!r}); the test would have skipped: {skip_reason(report)}"
        )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    fail_for_missing_package(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """A module that skips as a whole (``pytest.importorskip`` at import) is held to the same rule."""
    outcome = yield
    fail_for_missing_package(outcome.get_result())


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The tiny Llama and tokenizer (`qtuning_plugin.tiny`), built once per test session, shared by
    pytest-xdist's workers (a lock over their common temporary folder), and only read by the tests."""
    from filelock import FileLock

    from qtuning_plugin.tiny import build_tiny_model

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the session's folder, above each worker's own
    with FileLock(str(base / "tiny-model.lock")):
        return build_tiny_model(base / "tiny-model")

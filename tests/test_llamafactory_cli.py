"""`qtuning-llamafactory`'s own help, and its one-line answer where LLaMA-Factory is not installed.

LLaMA-Factory is made unimportable in the command's process (``sys.modules["llamafactory"] = None``,
what Python's import system reads as "not installed"), so these run the same in every environment,
LLaMA-Factory's included. Each is one short subprocess (about a second).
"""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

from qtuning_plugin.llamafactory.cli import NOT_INSTALLED

WITHOUT_LLAMAFACTORY = (
    "import sys; sys.modules['llamafactory'] = None; "
    "from qtuning_plugin.llamafactory.cli import main; sys.argv[0] = 'qtuning-llamafactory'; main()"
)


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_LLAMAFACTORY, *args],
        env={**os.environ, "PYTHONWARNINGS": "ignore"}, capture_output=True, text=True, timeout=120,
    )


def test_the_console_script_is_this_main():
    (script,) = [ep for ep in entry_points(group="console_scripts") if ep.name == "qtuning-llamafactory"]
    assert script.value == "qtuning_plugin.llamafactory.cli:main"


@pytest.mark.parametrize("args", [["--help"], ["-h"], ["help"], []], ids=["--help", "-h", "help", "no-arguments"])
def test_help_is_its_own_and_needs_no_llamafactory(args):
    proc = run(*args)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    usage = proc.stdout
    assert usage.startswith("usage: qtuning-llamafactory train CONFIG.yaml [key=value ...]\n"), usage
    assert "top-level `qtuning:`" in usage and "sample_keep_ratio" in usage
    assert "qtuning.sample_keep_ratio=0.125" in usage  # overrides of the section
    assert "docs/llamafactory.md" in usage
    assert "llamafactory-cli train -h" not in usage  # not LLaMA-Factory's own help


@pytest.mark.parametrize("args", [["train", "x.yaml"], ["train"], ["chat", "x.yaml"], ["version"]])
def test_without_llamafactory_a_command_names_the_extra_in_one_line(args, tmp_path):
    proc = run(*args)
    assert proc.returncode == 1
    assert proc.stdout == "" and proc.stderr == NOT_INSTALLED + "\n", proc.stderr
    assert "pip install 'qtuning-plugin[llamafactory]'" in NOT_INSTALLED

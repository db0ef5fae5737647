"""Reading ``train``'s arguments as LLaMA-Factory does, and taking the ``qtuning:`` section out of them
(in this process; the end-to-end runs are in test_train.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from qtuning_plugin import QTuningConfig
from qtuning_plugin.llamafactory.launcher import pop_section, read_run_args
from qtuning_plugin.rules import QTuningSettingsError


def write(tmp_path, config: dict):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return str(path)


def test_overrides_merge_into_the_section_and_the_rest(tmp_path):
    section = {"sample_keep_ratio": 0.5, "token_keep_ratio": 0.7}
    path = write(tmp_path, {"stage": "sft", "max_steps": 4, "qtuning": section})
    args = read_run_args([path, "qtuning.sample_keep_ratio=0.125", "max_steps=6", "qtuning.warmup_steps=2"])
    config = pop_section(args)
    assert args == {"stage": "sft", "max_steps": 6}
    assert config == QTuningConfig(sample_keep_ratio=0.125, token_keep_ratio=0.7, warmup_steps=2)


def test_an_override_alone_makes_a_section(tmp_path):
    args = read_run_args([write(tmp_path, {"stage": "sft"}), "qtuning.enabled=false"])
    assert pop_section(args) == QTuningConfig(enabled=False)


def test_an_empty_section_enables_the_defaults_and_none_means_no_section(tmp_path):
    assert pop_section({"stage": "sft", "qtuning": None}) == QTuningConfig()
    assert pop_section({"stage": "sft"}) is None
    dashed = ["--stage", "sft"]  # `train --key value ...`: LLaMA-Factory's plain arguments, no section
    assert pop_section(dashed) is None and dashed == ["--stage", "sft"]


@pytest.mark.parametrize(
    "section, message",
    [
        (0.5, "qtuning: expected a mapping of settings"),
        ({"sample_keep_ratio": 0}, "qtuning.sample_keep_ratio: Input should be greater than 0"),
        ({"token_keep_rato": 0.5}, "qtuning.token_keep_rato: unknown key; the keys are enabled, sample_keep_ratio,"),
        ({"scoring": "single_pass"}, "qtuning.scoring: single_pass triages while the loss is computed"),
        ({"warmup_steps": -1, "context_weight": 2}, "qtuning.context_weight: Input should be less than or equal to 1"),
    ],
)
def test_a_bad_section_names_the_key(section, message):
    args = {"stage": "sft", "qtuning": section}
    with pytest.raises(QTuningSettingsError) as error:
        pop_section(args)
    assert message in str(error.value)
    if isinstance(section, dict) and len(section) == 2:  # every problem is named, one per line
        assert "qtuning.warmup_steps: Input should be greater than or equal to 0" in str(error.value)


def test_the_adapter_imports_no_llamafactory_until_it_runs():
    modules = [f"qtuning_plugin.llamafactory.{name}" for name in ("cli", "launcher", "rules")]
    code = (
        f"import importlib, sys; [importlib.import_module(m) for m in {modules}]; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'llamafactory'))"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"

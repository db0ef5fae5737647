"""The start-up refusals (`qtuning_plugin.llamafactory.rules`) on arguments parsed by LLaMA-Factory's
own ``get_train_args``, in this process (no model loads: parsing only)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from llamafactory.hparams import get_train_args

from lf_run import example_config
from qtuning_plugin.llamafactory.launcher import pop_section, read_run_args
from qtuning_plugin.llamafactory.rules import ARGUMENT_RULES, LlamaFactoryArgs, check_arguments, check_environment
from qtuning_plugin.rules import QTuningSettingsError, refusals


def parsed(tmp_path: Path, **settings) -> LlamaFactoryArgs:
    """The example's arguments with ``settings``, as LLaMA-Factory parses and checks them."""
    config = yaml.safe_load(example_config(tmp_path, tmp_path / "model", steps=2, **settings).read_text())
    return LlamaFactoryArgs(*get_train_args(config))


def test_the_example_is_not_refused(tmp_path):
    assert refusals(ARGUMENT_RULES, parsed(tmp_path)) == []
    check_arguments(parsed(tmp_path))


@pytest.mark.parametrize(
    "settings, named",
    [
        ({"stage": "pt"}, "stage: 'pt': Q-Tuning is for supervised fine-tuning only"),
        ({"use_dft_loss": True}, "use_dft_loss"),
        ({"use_eaft_loss": True}, "use_eaft_loss"),
        ({"use_asft_loss": True}, "use_asft_loss"),
        ({"moe_aux_loss_coef": 0.01}, "moe_aux_loss_coef"),
        ({"use_hyper_parallel": True, "finetuning_type": "full"}, "use_hyper_parallel"),
        ({"packing": True, "neat_packing": True}, "neat_packing"),
    ],
)
def test_each_setting_is_refused_by_name(tmp_path, settings, named):
    args = parsed(tmp_path, **settings)
    messages = refusals(ARGUMENT_RULES, args)
    assert len(messages) == 1 and messages[0].startswith(named), messages
    with pytest.raises(QTuningSettingsError, match=named):
        check_arguments(args)


def test_loss_replacements_are_named_together(tmp_path):
    messages = refusals(ARGUMENT_RULES, parsed(tmp_path, use_dft_loss=True, use_eaft_loss=True))
    assert len(messages) == 1 and messages[0].startswith("use_dft_loss, use_eaft_loss:"), messages


def test_packing_is_honoured(tmp_path):
    """LLaMA-Factory 0.9.5's `packing: true` rows restart position_ids at each sample (checked end to end in
    test_train.py): each is triaged on its own, in either scope and scoring."""
    assert refusals(ARGUMENT_RULES, parsed(tmp_path, packing=True)) == []


@pytest.mark.parametrize("variable", ["USE_V1", "USE_RAY", "USE_MCA"])
@pytest.mark.parametrize("value", ["1", "true", "y"])
def test_environment_switches_are_refused_by_name(variable, value):
    with pytest.raises(QTuningSettingsError, match=f"{variable}:"):
        check_environment({variable: value})
    check_environment({variable: "0"})
    check_environment({})


def test_the_shipped_example_passes_both_parsers_and_every_rule(tmp_path):
    """``examples/llamafactory-qtuning.yaml``: its section validates, and LLaMA-Factory parses the
    rest (here on CPU, so without ``bf16``) without a refusal."""
    args = read_run_args([str(Path(__file__).resolve().parents[1] / "examples" / "llamafactory-qtuning.yaml")])
    config = pop_section(args)
    assert config is not None and config.enabled and config.sample_keep_ratio == 0.25
    assert "qtuning" not in args
    args.update(output_dir=str(tmp_path), bf16=False)
    check_arguments(LlamaFactoryArgs(*get_train_args(args)))

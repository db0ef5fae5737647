"""Smoke test of the quality benchmark: ``benchmarks/quality/run.py --quick`` end to end (subprocess, CPU).

About 2 minutes of CPU with the pre-trained checkpoint cached (``$QTUNING_QUALITY_CACHE``,
default ``~/.cache/qtuning/quality``), about 2 more the first time, when it pre-trains.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

# The toy benchmark (transformers' Trainer, no Axolotl) is a tool of `make test`'s environment: it runs there only.
pytestmark = [pytest.mark.integration, pytest.mark.env_independent]

RUN = Path(__file__).resolve().parents[1] / "benchmarks" / "quality" / "run.py"
ARMS = {"full", "random_25", "qtuning_25x70", "qtuning_12.5x50", "reversed_25x70", "triage_only_25", "oracle_clean", "oracle_25"}
STEP_SCOPE = {"qtuning_25x70_step_32x1", "qtuning_25x70_step_4x8", "qtuning_25x70_step_1x32"}
# --quick: the 30% conditions at equal steps and equal time, 0% and 70% at equal steps, the triage batch sizes.
EXPECTED = {
    **{f"{cond}/equal_steps": ARMS for cond in ("digits_30", "answer_30", "clean_0", "digits_70", "answer_70")},
    **{f"{cond}/equal_time": ARMS - {"full"} for cond in ("digits_30", "answer_30")},
    "digits_30/triage_batch": STEP_SCOPE,
}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    proc = subprocess.run(
        [sys.executable, str(RUN), "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=1800, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, out


def test_last_line_is_one_json_object_with_every_arms_accuracy(quick_run):
    stdout, _ = quick_run
    result = json.loads(stdout.strip().splitlines()[-1])
    accuracy = result["accuracy"]
    assert set(accuracy) == set(EXPECTED)
    for key, arms in EXPECTED.items():
        assert set(accuracy[key]) == arms, key
        for arm, value in accuracy[key].items():
            assert isinstance(value, (int, float)) and math.isfinite(value) and 0 <= value <= 100, (key, arm, value)


def test_step_scope_selections_do_not_depend_on_the_step_shape(quick_run):
    """One triage over the optimizer step's 32 samples: the same selection at 32 x 1, 4 x 8 and 1 x 32,
    and at 32 x 1 the same as the plugin's own triage of a 32-row micro-batch."""
    _, out = quick_run
    triage_batch = json.loads((out / "results_quick.json").read_text())["triage_batch"]
    assert set(triage_batch) == STEP_SCOPE
    for name, run in triage_batch.items():
        assert run["same_as_32x1"]["identical_steps"] == run["same_as_32x1"]["steps"] == 40, (name, run["same_as_32x1"])
    plain = triage_batch["qtuning_25x70_step_32x1"]["same_as_plain_plugin_mbs32"]
    assert plain["identical_steps"] == plain["steps"] == 40, plain


def test_plots_are_written(quick_run):
    _, out = quick_run
    for name in ("quality", "quality_answer", "quality_compute", "quality_noise"):
        assert (out / f"{name}_quick.png").stat().st_size > 10_000, name

"""Smoke test of the quality benchmark's real-model track: ``benchmarks/quality/real.py --quick`` end to end
(subprocess, CPU, SmolLM2-135M-Instruct): 2 seeds x 4 arms at the budget of 2 full-data steps.

It runs where ``QTUNING_REAL_SMOKE=1`` (``make test`` sets it; ``make test-latest`` does not: this
track uses transformers and peft only, no Axolotl, so the second environment would repeat it
for its minutes), on the model folder ``$QTUNING_SMOLLM2_DIR`` or else the one
`qtuning_plugin.smollm2.ensure_model` makes and caches. Elsewhere it is skipped.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from scipy import stats

pytestmark = pytest.mark.integration

RUN = Path(__file__).resolve().parents[1] / "benchmarks" / "quality" / "real.py"
ARMS = ("full", "random_25", "qtuning_25x50", "oracle_25")
SEEDS, STEPS = 2, 2  # --quick's


def model_dir() -> Path:
    if os.environ.get("QTUNING_REAL_SMOKE") != "1":
        pytest.skip("the real-model smoke test runs under `make test` (QTUNING_REAL_SMOKE=1) only")
    if os.environ.get("QTUNING_SMOLLM2_DIR"):
        return Path(os.environ["QTUNING_SMOLLM2_DIR"])
    from qtuning_plugin.smollm2 import ensure_model

    return ensure_model()


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out, model = tmp_path_factory.mktemp("quality_real"), model_dir()
    proc = subprocess.run(
        [sys.executable, str(RUN), "--model", str(model), "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=1800, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "results_real_quick.json").read_text()), out, model


def runs_of(result: dict, arm: str) -> dict[int, dict]:
    return {r["seed"]: r for r in result["runs"] if r["arm"] == arm}


def test_the_record_names_model_versions_seeds_cost_model_and_time(quick_run):
    result, _, model = quick_run
    digest = hashlib.sha256((model / "model.safetensors").read_bytes()).hexdigest()
    assert result["model"] == {"name": "SmolLM2-135M-Instruct", "weights_file": "model.safetensors", "sha256": digest}
    assert {"torch", "transformers", "qtuning_plugin"} <= set(result["versions"])
    assert result["seeds"] == list(range(SEEDS))
    assert result["cost_model"]["fb_per_forward"] > 1 and result["total_wall_s"] > 0
    assert result["settings"]["steps"] == STEPS and result["settings"]["chosen_by"]


def test_every_arm_and_the_base_model_are_graded_at_every_seed(quick_run):
    result, _, _ = quick_run
    for arm in ("base", *ARMS):
        runs = runs_of(result, arm)
        assert sorted(runs) == list(range(SEEDS)), arm
        for run in runs.values():
            final = run["points"]["final"]
            assert math.isfinite(final["loss"]) and 0 < final["loss"], arm
            assert 0 <= final["acc"] <= 100 and len(final["correct"]) == result["settings"]["n_test"], arm
            assert final["acc"] == pytest.approx(100 * sum(final["correct"]) / len(final["correct"]))
            assert final["loss"] == pytest.approx(sum(final["nll"]) / sum(final["tokens"]))


def test_equal_cost_accounting_matches_a_hand_count(quick_run):
    """Per run: the forward-only tokens are the items Q-Tuning scored, the forward+backward tokens the
    items each arm trained, the cost their weighted sum; the budget is full-data SFT's tokens over its
    steps; each run stops at the first step that reaches it."""
    result, _, _ = quick_run
    ratio = result["cost_model"]["fb_per_forward"]
    full = runs_of(result, "full")
    for arm in ARMS:
        for seed, run in runs_of(result, arm).items():
            tokens = run["item_tokens"]
            count = [sum(tokens[i] for step in run[key] for i in step) for key in ("scored", "trained")]
            last = run["steps"][-1]
            assert [last["forward_tokens"], last["forward_backward_tokens"]] == count, (arm, seed)
            assert (count[0] > 0) == (arm == "qtuning_25x50")
            assert last["cost"] == pytest.approx(count[0] + ratio * count[1])
            assert run["budget"] == pytest.approx(ratio * sum(tokens[i] for step in full[seed]["trained"] for i in step))
            assert last["cost"] >= run["budget"] > run["steps"][-2]["cost"], (arm, seed)
            assert run["points"]["final"]["step"] == len(run["steps"])
    assert [len(run["steps"]) for run in full.values()] == [STEPS] * SEEDS


def test_paired_differences_are_recomputed_from_the_per_seed_numbers(quick_run):
    result, _, _ = quick_run
    comparisons = result["summary"]["comparisons"]
    assert {"qtuning_25x50 - random_25", "oracle_25 - random_25", "qtuning_25x50 - full"} <= set(comparisons)
    for name, by_key in comparisons.items():
        a, b = (runs_of(result, arm) for arm in name.split(" - "))
        for key, c in by_key.items():
            diffs = [a[s]["points"]["final"][key] - b[s]["points"]["final"][key] for s in range(SEEDS)]
            assert c["per_seed"] == pytest.approx(diffs), (name, key)
            mean = statistics.mean(diffs)
            assert c["mean"] == pytest.approx(mean)
            half = stats.t.ppf(0.975, SEEDS - 1) * statistics.stdev(diffs) / math.sqrt(SEEDS)
            assert c["t_ci"] == pytest.approx([mean - half, mean + half], rel=1e-3, abs=1e-9), (name, key)
            assert min(diffs) <= c["bootstrap_ci"][0] <= c["bootstrap_ci"][1] <= max(diffs)


def test_oracle_trains_on_clean_samples_only_and_the_figure_is_written(quick_run):
    result, out, _ = quick_run
    assert all(r["corrupted_sample_share"] == 0 for r in runs_of(result, "oracle_25").values())
    assert all(0 < r["corrupted_sample_share"] < 1 for r in runs_of(result, "full").values())
    assert (out / "quality_real_quick.png").stat().st_size > 10_000

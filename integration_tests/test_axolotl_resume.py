"""`axolotl train` resumed from a checkpoint continues Q-Tuning as the uninterrupted run (about 2 minutes).

Run A trains 6 steps and saves at steps 3 and 6; run B starts from a copy of
A's checkpoint-3 (`resume_from_checkpoint`) in its own output folder and
trains steps 4-6. B's logged Q-Tuning metrics of steps 4-6 (quadrant counts,
thresholds, kept fractions, the cumulative tokens saved, whose running totals
come back from ``qtuning_state.json``) must equal A's, and B's log history
(the quadrant plot's data) and EU-plane points must hold steps 1-3 too.
"""

from __future__ import annotations

import json
import shutil

import pytest

from axolotl_run import run_axolotl_train, tiny_config

pytestmark = pytest.mark.integration

STEPS, SAVE_AT = 6, 3
OVERRIDES = dict(
    steps=STEPS,
    save_steps=SAVE_AT,
    val_set_size=0.0,
    eval_steps=None,
    logging_steps=1,
    dataset_num_proc=1,
)


def _qtuning_logs(state: dict) -> dict[int, dict]:
    return {
        entry["step"]: {key: value for key, value in entry.items() if key.startswith("qtuning/")}
        for entry in state["log_history"]
        if "loss" in entry
    }


def test_resumed_run_continues_the_qtuning_metrics(tiny_model, tmp_path):
    full = run_axolotl_train(tiny_config(tmp_path / "full", tiny_model, **OVERRIDES))
    assert full.returncode == 0, full.tail()
    checkpoint = full.output_dir / f"checkpoint-{SAVE_AT}"
    assert (checkpoint / "qtuning_state.json").is_file()

    resumed_dir = tmp_path / "resumed"
    shutil.copytree(checkpoint, resumed_dir / "out" / checkpoint.name)
    config = tiny_config(
        resumed_dir, tiny_model, resume_from_checkpoint=str(resumed_dir / "out" / checkpoint.name), **OVERRIDES
    )
    resumed = run_axolotl_train(config)
    assert resumed.returncode == 0, resumed.tail()
    # It really resumed: only steps 4-6 ran (each logs one `{'loss': ...}` line).
    assert resumed.output.count("'loss'") == STEPS - SAVE_AT and full.output.count("'loss'") == STEPS

    expected, got = _qtuning_logs(full.trainer_state()), _qtuning_logs(resumed.trainer_state())
    assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1))
    for step in range(SAVE_AT + 1, STEPS + 1):
        assert expected[step] and expected[step].keys() == got[step].keys()
        for key, value in expected[step].items():
            assert got[step][key] == pytest.approx(value, rel=1e-5, abs=1e-8), (step, key)
    saved = [got[step]["qtuning/tokens_saved_frac_cumulative"] for step in range(1, STEPS + 1)]
    assert all(0.0 < value < 1.0 for value in saved)

    state = json.loads((resumed.output_dir / f"checkpoint-{STEPS}" / "qtuning_state.json").read_text())
    # The EU-plane points of steps 1-3 came back from checkpoint-3's qtuning_state.json.
    assert {point[4] for point in state["points"]} == set(range(1, STEPS + 1))
    for name in ("qtuning_eu_plane.png", "qtuning_quadrant_fractions.png"):
        assert (resumed.output_dir / name).stat().st_size > 10_000

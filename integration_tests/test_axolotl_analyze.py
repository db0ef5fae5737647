"""End to end: `axolotl qtuning analyze` on the tiny CPU example (subprocess, offline), about 40 s.

The config-level errors that need no model (missing file, no `qtuning:`
section) are tested in-process in `tests/test_analyze.py`.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from axolotl_run import OFFLINE_ENV, tiny_config

pytestmark = pytest.mark.integration

SAMPLES = 48


def analyze(config: Path, *args: str) -> subprocess.CompletedProcess:
    """``axolotl qtuning analyze CONFIG ARGS`` through Axolotl's own CLI (entry point `axolotl.cli_commands`)."""
    command = [sys.executable, "-m", "axolotl.cli.main", "qtuning", "analyze", str(config), *args]
    env = {**os.environ, **OFFLINE_ENV}
    return subprocess.run(command, cwd=config.parent, env=env, capture_output=True, text=True, timeout=300)


def test_analyze_scores_the_dataset_and_writes_the_table_csv_and_picture(tiny_model, tmp_path):
    config = tiny_config(tmp_path, tiny_model, val_set_size=0.0, eval_steps=None)
    out = tmp_path / "analysis"
    run = analyze(config, "--max-samples", str(SAMPLES), "--out", str(out))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"Q-Tuning analysis of {SAMPLES} samples (sample_keep_ratio=0.5, token_keep_ratio=0.5)" in run.stdout
    for line in ("Q1 harmful noise", "Q4 calibration", "kept samples", "whole set", "per mini-batch of 8"):
        assert line in run.stdout
    assert "qtuning: scoring" in run.stderr  # the progress bar

    with open(out / "samples.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["index"]) for row in rows] == list(range(SAMPLES))
    assert all(float(row["ppl"]) > 1.0 and float(row["ent"]) > 0.0 for row in rows)
    assert all(int(row["trainable_tokens"]) > 0 for row in rows)
    kept = [row for row in rows if row["quadrant"] in ("Q2", "Q4")]
    assert len(kept) == SAMPLES // 2  # the whole set at sample_keep_ratio 0.5
    assert {row["quadrant_per_batch"] for row in rows} <= {"Q1", "Q2", "Q3", "Q4", "middle"}

    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert sum(summary["whole_set"]["counts"].values()) == SAMPLES
    assert summary["per_mini_batch"]["kept_sample_frac"] == pytest.approx(0.5)
    assert (out / "eu_plane.png").stat().st_size > 10_000


def test_a_dataset_without_trainable_tokens_is_a_one_line_error(tiny_model, tmp_path):
    data = tmp_path / "prompts_only.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"Say the number {i}."}]} for i in range(16)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    config = tiny_config(tmp_path, tiny_model, val_set_size=0.0, eval_steps=None)
    cfg = yaml.safe_load(config.read_text(encoding="utf-8"))
    cfg["datasets"][0]["path"] = str(data)  # user turns only: nothing for `roles_to_train: [assistant]`
    config.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")

    run = analyze(config, "--out", str(tmp_path / "analysis"))
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: ") and "trainable token" in last, run.stderr[-3000:]
    assert "Traceback" not in run.stderr

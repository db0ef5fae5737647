"""End to end: `axolotl qtuning analyze` and `select` on the tiny CPU example (subprocesses, offline):
about 40 s for each command, and 50 s for the `axolotl train` on what `select` wrote.

The config-level errors that need no model (missing file, no `qtuning:` section, no `datasets:`, an
output folder in use) are tested in-process in `tests/test_axolotl_cli.py`.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from axolotl_run import OFFLINE_ENV, run_axolotl_train, tiny_config

pytestmark = pytest.mark.integration

SAMPLES = 48


def qtuning_command(name: str, config: Path, *args: str) -> subprocess.CompletedProcess:
    """``axolotl qtuning NAME CONFIG ARGS`` through Axolotl's own CLI (entry point `axolotl.cli_commands`)."""
    command = [sys.executable, "-m", "axolotl.cli.main", "qtuning", name, str(config), *args]
    env = {**os.environ, **OFFLINE_ENV}
    return subprocess.run(command, cwd=config.parent, env=env, capture_output=True, text=True, timeout=300)


def test_analyze_scores_the_dataset_and_writes_the_table_csv_and_picture(tiny_model, tmp_path):
    config = tiny_config(tmp_path, tiny_model, val_set_size=0.0, eval_steps=None)
    out = tmp_path / "analysis"
    run = qtuning_command("analyze", config, "--max-samples", str(SAMPLES), "--out", str(out))
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

    run = qtuning_command("analyze", config, "--out", str(tmp_path / "analysis"))
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: ") and "trainable token" in last, run.stderr[-3000:]
    assert "Traceback" not in run.stderr


def test_select_writes_a_dataset_that_axolotl_trains_on_with_the_printed_lines(tiny_model, tmp_path):
    """`select` on the example's first 48 training rows (18 more held out by its `val_set_size`), then
    `axolotl train` with the config lines it printed: Axolotl takes the rows as pre-tokenized and trains
    on exactly the kept tokens (its own `tokens/trainable` count), evaluates on the held-out split,
    and Q-Tuning is off, as the lines say."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    from qtuning_plugin.sample_key import sample_key
    from qtuning_plugin.tiny import dataset_path

    config = tiny_config(tmp_path, tiny_model)
    out = tmp_path / "selection"
    run = qtuning_command("select", config, "--max-samples", str(SAMPLES), "--out", str(out))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"Q-Tuning selection of {SAMPLES} training rows all rows at once" in run.stdout
    block = run.stdout.split("would select again at every step):\n\n")[1].split("\n\nWith LLaMA-Factory")[0]
    lines = yaml.safe_load(block)
    dataset = str(out / "dataset")
    assert lines == {
        "datasets": [{"path": dataset}],
        "test_datasets": [{"path": dataset, "split": "validation"}],
        "val_set_size": 0,
        "qtuning": {"enabled": False},
    }, block
    assert f"tokenized_path: {dataset}" in run.stdout

    with open(out / "report.csv", encoding="utf-8") as handle:
        report = list(csv.DictReader(handle))
    assert [int(row["index"]) for row in report] == list(range(SAMPLES))
    assert {row["dataset"] for row in report} == {str(dataset_path())}
    kept = [row for row in report if row["kept"] == "True"]
    assert len(kept) >= SAMPLES // 2  # K of the 48 at sample_keep_ratio 0.5, more if the bisection overshoots
    written = load_from_disk(dataset)
    assert len(written["train"]) == len(kept) and len(written["validation"]) == 18

    # each written row is the report's kept row, its tokens those of the JSONL line the report names
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    source = dataset_path().read_text(encoding="utf-8").splitlines()
    for row, entry in zip(written["train"], kept):
        assert sample_key(row["input_ids"]) == entry["sample_key"]
        text = tokenizer.decode(row["input_ids"])
        assert all(message["content"] in text for message in json.loads(source[int(entry["dataset_row"])])["messages"])
        assert sum(label != -100 for label in row["labels"]) == int(entry["tokens_kept"])
    kept_tokens = sum(int(entry["tokens_kept"]) for entry in kept)
    assert kept_tokens < sum(int(entry["trainable_tokens"]) for entry in kept)  # Q2 rows' tokens pruned

    cfg = yaml.safe_load(config.read_text(encoding="utf-8"))
    steps = math.ceil(len(kept) / 8)  # one epoch at micro_batch_size 8
    cfg.update(lines, max_steps=steps, save_steps=steps, eval_steps=steps, output_dir=str(tmp_path / "trained"))
    train_config = tmp_path / "train" / "config.yml"
    train_config.parent.mkdir()
    train_config.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    trained = run_axolotl_train(train_config)
    assert trained.returncode == 0, trained.tail()
    assert "Q-Tuning is active" not in trained.output
    state = trained.trainer_state()
    logs = trained.train_logs()
    assert len(logs) == steps and not [key for entry in logs for key in entry if key.startswith("qtuning/")]
    assert logs[-1]["tokens/trainable"] == kept_tokens and logs[-1]["epoch"] == pytest.approx(1.0)
    assert len([entry for entry in state["log_history"] if "eval_loss" in entry]) == 2

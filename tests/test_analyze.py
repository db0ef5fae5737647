"""`axolotl qtuning analyze`: triage of scored samples, the table, and the one-line errors that
need no model. The end-to-end run on the tiny example is `integration_tests/test_analyze.py`."""

import math

import pytest
from click.testing import CliRunner

from qtuning_plugin import QTuningConfig
from qtuning_plugin.analyze import AnalysisError, Scores, analyze_scores, format_table, write_outputs
from qtuning_plugin.axolotl.cli import qtuning


def scores(n=16, seed=0):
    import random

    rng = random.Random(seed)
    ppl = [math.exp(rng.uniform(0.5, 3.0)) for _ in range(n)]
    ent = [rng.uniform(0.5, 2.5) for _ in range(n)]
    tokens = [rng.randint(3, 20) for _ in range(n)]
    ppl[3], ent[3], tokens[3] = float("nan"), float("nan"), 0  # a sample without trainable tokens
    return Scores(ppl, ent, tokens)


def test_both_triage_modes_keep_the_configured_fraction():
    config = QTuningConfig(sample_keep_ratio=0.5, token_keep_ratio=0.5)
    result = analyze_scores(scores(), config, mini_batch=8)
    whole, per_batch = result["summary"]["whole_set"], result["summary"]["per_mini_batch"]
    assert whole["counts"][""] == per_batch["counts"][""] == 1
    assert whole["counts"]["Q2"] + whole["counts"]["Q4"] == round(0.5 * 15)  # K of the 15 valid samples
    assert sum(whole["counts"].values()) == sum(per_batch["counts"].values()) == 16
    rows = result["rows"]
    trained = sum(r["trainable_tokens"] if r["quadrant"] == "Q4" else max(1, r["trainable_tokens"] // 2)
                  for r in rows if r["quadrant"] in ("Q2", "Q4"))
    assert whole["trained_token_frac"] == pytest.approx(trained / sum(r["trainable_tokens"] for r in rows))
    row = result["rows"][3]
    assert row["quadrant"] == row["quadrant_per_batch"] == "" and row["trainable_tokens"] == 0
    table = format_table({"whole set": whole, "per mini-batch of 8": per_batch})
    assert "Q2 misconception" in table and "per mini-batch of 8" in table


def test_outputs(tmp_path):
    result = analyze_scores(scores(), QTuningConfig(sample_keep_ratio=0.25), mini_batch=4)
    paths = write_outputs(result, str(tmp_path))
    assert (tmp_path / "samples.csv").read_text().splitlines()[0] == (
        "index,ppl,log_ppl,ent,trainable_tokens,quadrant,filled,quadrant_per_batch"
    )
    assert (tmp_path / "eu_plane.png").stat().st_size > 10_000
    assert set(paths) == {"samples.csv", "summary.json", "eu_plane.png"}


def test_no_trainable_token_at_all_is_an_error():
    empty = Scores([float("nan")] * 4, [float("nan")] * 4, [0] * 4)
    with pytest.raises(AnalysisError, match="no sample of the dataset has a trainable token"):
        analyze_scores(empty, QTuningConfig(), mini_batch=2)


def _one_line_error(result, code):
    assert result.exit_code == code, result.output
    lines = result.output.strip().splitlines()
    return lines[-1]


def test_a_missing_config_file_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(qtuning, ["analyze", str(tmp_path / "nope.yml")])
    assert "does not exist" in _one_line_error(result, 2)


def test_a_config_without_a_qtuning_section_is_an_error(tmp_path):
    config = tmp_path / "plain.yml"
    config.write_text("base_model: some/model\nmicro_batch_size: 2\n")
    result = CliRunner().invoke(qtuning, ["analyze", str(config)])
    line = _one_line_error(result, 1)
    assert line.startswith("Error: ") and "has no `qtuning:` section" in line


def test_an_invalid_qtuning_section_is_an_error(tmp_path):
    config = tmp_path / "bad.yml"
    config.write_text("base_model: some/model\nqtuning:\n  sample_keep_ratio: 2.0\n")
    line = _one_line_error(CliRunner().invoke(qtuning, ["analyze", str(config)]), 1)
    assert line.startswith("Error: invalid `qtuning:` section") and "sample_keep_ratio" in line


def test_max_samples_must_be_positive(tmp_path):
    config = tmp_path / "c.yml"
    config.write_text("qtuning: {}\n")
    result = CliRunner().invoke(qtuning, ["analyze", str(config), "--max-samples", "0"])
    assert result.exit_code == 2

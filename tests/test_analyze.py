"""`qtuning_plugin.analyze`, the back-end of `axolotl qtuning analyze`: scoring, triage of scored
samples, the table and the outputs. The command's own errors: tests/test_axolotl_cli.py; the
end-to-end run on the tiny example: integration_tests/test_axolotl_analyze.py."""

import math

import pytest

from qtuning_plugin import QTuningConfig
from qtuning_plugin.analyze import AnalysisError, Scores, analyze_scores, format_table, write_outputs


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
    analysis = analyze_scores(scores(), config, mini_batch=8)
    whole, per_batch = analysis.whole_set, analysis.per_mini_batch
    assert whole.counts[""] == per_batch.counts[""] == 1
    assert whole.counts["Q2"] + whole.counts["Q4"] == round(0.5 * 15)  # K of the 15 valid samples
    assert sum(whole.counts.values()) == sum(per_batch.counts.values()) == 16
    rows = analysis.rows
    trained = sum(r.trainable_tokens if r.quadrant == "Q4" else max(1, r.trainable_tokens // 2)
                  for r in rows if r.quadrant in ("Q2", "Q4"))
    assert whole.trained_token_frac == pytest.approx(trained / sum(r.trainable_tokens for r in rows))
    row = rows[3]
    assert row.quadrant == row.quadrant_per_batch == "" and row.trainable_tokens == 0
    # Each group of 8 is triaged on its own: K = round(0.5 * valid samples in it) kept per group.
    assert sum(r.quadrant_per_batch in ("Q2", "Q4") for r in rows[:8]) == round(0.5 * 7)
    assert sum(r.quadrant_per_batch in ("Q2", "Q4") for r in rows[8:]) == round(0.5 * 8)
    table = analysis.table()
    assert "Q2 misconception" in table and "per mini-batch of 8" in table
    assert table == format_table({"whole set": whole, "per mini-batch of 8": per_batch})


def test_scores_are_the_full_logits_statistics_in_float64():
    """`score_dataset`'s per-sample PPL and Ent against each row alone through the model's own
    logits, in float64: exp of the mean cross-entropy and the mean full-vocabulary entropy over
    the trainable targets. Batches of 3 rows of different lengths, so that rows are padded."""
    import torch
    import torch.nn.functional as F

    from qtuning_plugin.analyze import score_dataset

    from conftest import random_batch, tiny_llama

    batch = random_batch(batch=7, length=14, seed=5)
    rows = []
    for b in range(7):
        used = int(batch["attention_mask"][b].sum()) - b % 3  # ragged lengths
        rows.append({key: batch[key][b, :used].tolist() for key in ("input_ids", "labels")})
    rows[4]["labels"] = [-100] * len(rows[4]["labels"])  # no trainable token
    model = tiny_llama()
    scores = score_dataset(model, rows, QTuningConfig(backend="torch"), batch_size=3, pad_token_id=0, progress=False)

    model.eval()
    for row, ppl, ent, tokens in zip(rows, scores.ppl, scores.ent, scores.tokens):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1].double()
        targets = torch.tensor(row["labels"][1:])
        mask = targets != -100
        assert tokens == int(mask.sum())
        if not mask.any():
            assert math.isnan(ppl) and math.isnan(ent)
            continue
        logp = logits.log_softmax(-1)
        expected_ppl = F.cross_entropy(logits[mask], targets[mask]).exp().item()
        expected_ent = (-(logp.exp() * logp).sum(-1))[mask].mean().item()
        assert ppl == pytest.approx(expected_ppl, rel=2e-5)
        assert ent == pytest.approx(expected_ent, rel=2e-5)


def test_quadrants_by_hand():
    """The whole-set quadrants of hand-placed samples (thresholds worked out in
    `test_triage.test_one_sample_per_quadrant_and_a_middle_band`), and the token fraction:
    Q2 keeps floor(0.5 * 9) = 4 of its 9 tokens, Q4 all its 5."""
    ppl = [10.0, 10.0, 1.0, 1.0, 5.0, 5.0, 5.0, 5.0]
    ent = [3.0, 0.1, 0.1, 3.0, 1.5, 1.5, 1.5, 1.5]
    tokens = [4, 9, 6, 5, 3, 3, 3, 3]
    analysis = analyze_scores(Scores(ppl, ent, tokens), QTuningConfig(sample_keep_ratio=0.25), mini_batch=8)
    assert [row.quadrant for row in analysis.rows] == ["Q1", "Q2", "Q3", "Q4"] + ["middle"] * 4
    whole = analysis.whole_set
    assert whole.counts == {"Q1": 1, "Q2": 1, "Q3": 1, "Q4": 1, "middle": 4, "": 0}
    assert whole.kept_sample_frac == 0.25
    assert whole.trained_token_frac == pytest.approx((4 + 5) / 36)
    assert whole.thresholds["ppl_hi"] == pytest.approx(5 + 0.285 * 5) and whole.alpha == pytest.approx(0.245)


def test_outputs(tmp_path):
    import csv
    import json

    analysis = analyze_scores(scores(), QTuningConfig(sample_keep_ratio=0.25), mini_batch=4)
    paths = write_outputs(analysis, str(tmp_path))
    assert (tmp_path / "samples.csv").read_text().splitlines()[0] == (
        "index,ppl,log_ppl,ent,trainable_tokens,quadrant,filled,quadrant_per_batch"
    )
    with open(tmp_path / "samples.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["quadrant"] for row in rows] == [row.quadrant for row in analysis.rows]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary) == [
        "samples", "sample_keep_ratio", "token_keep_ratio", "mini_batch", "whole_set", "per_mini_batch"
    ]
    assert summary["samples"] == 16 and summary["mini_batch"] == 4
    assert list(summary["whole_set"]) == ["counts", "kept_sample_frac", "trained_token_frac", "alpha", "thresholds"]
    assert list(summary["per_mini_batch"]) == ["counts", "kept_sample_frac", "trained_token_frac"]
    assert summary["whole_set"]["counts"] == analysis.whole_set.counts
    assert (tmp_path / "eu_plane.png").stat().st_size > 10_000
    assert set(paths) == {"samples.csv", "summary.json", "eu_plane.png"}


def test_no_trainable_token_at_all_is_an_error():
    empty = Scores([float("nan")] * 4, [float("nan")] * 4, [0] * 4)
    with pytest.raises(AnalysisError, match="no sample of the dataset has a trainable token"):
        analyze_scores(empty, QTuningConfig(), mini_batch=2)

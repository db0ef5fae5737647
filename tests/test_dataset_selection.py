"""`qtuning_plugin.dataset_selection`, the whole-dataset selection behind `axolotl qtuning select`, on
a tiny model in-process, against SPEC sections 2, 4 and 5 (`tests/reference.py`) applied to scores
computed with plain torch from the model's full logits. The command's errors that need no model:
tests/test_axolotl_cli.py; Axolotl training on the written dataset:
integration_tests/test_axolotl_analyze.py; LLaMA-Factory loading it: llamafactory_tests/test_select.py."""

import csv
import math

import pytest
import torch
import torch.nn.functional as F

from qtuning_plugin import QTuningConfig, select_dataset, write_selection
from qtuning_plugin.dataset_selection import match_origins
from qtuning_plugin.sample_key import sample_key

from conftest import random_batch, tiny_llama
from reference import reference_select

ROWS = 26
SAMPLE_KEEP, TOKEN_KEEP = 0.25, 0.5


@pytest.fixture(scope="module")
def rows():
    """Unpadded rows of different lengths, prompts untrained, one row without a trainable token."""
    batch = random_batch(batch=ROWS, length=20, seed=11)
    out = []
    for b in range(ROWS):
        used = int(batch["attention_mask"][b].sum()) - b % 4
        out.append({key: batch[key][b, :used].tolist() for key in ("input_ids", "attention_mask", "labels")})
    out[5]["labels"] = [-100] * len(out[5]["labels"])
    return out


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=3).eval()


def full_logits_stats(model, row):
    """Per-target NLL and entropy of one row alone, in float64 from the model's full logits, and the
    trainable-target mask (``labels[t + 1] != -100``)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1].double()
    targets = torch.tensor(row["labels"][1:])
    logp = logits.log_softmax(-1)
    nll = F.cross_entropy(logits, targets.clamp(min=0), reduction="none")
    entropy = -(logp.exp() * logp).sum(-1)
    return nll, entropy, targets != -100


def reference_selection(model, rows, window):
    """For each window: SPEC's kept rows and their labels with -100 on the pruned tokens."""
    stats = [full_logits_stats(model, row) for row in rows]
    kept, labels = {}, {}
    for start in range(0, len(rows), window):
        part = range(start, min(start + window, len(rows)))
        width = max(stats[i][0].numel() for i in part)
        nll, ent = torch.zeros(len(part), width, dtype=torch.float64), torch.zeros(len(part), width, dtype=torch.float64)
        mask = torch.zeros(len(part), width, dtype=torch.bool)
        for j, i in enumerate(part):
            n = stats[i][0].numel()
            nll[j, :n], ent[j, :n], mask[j, :n] = stats[i]
        keep, _, token_mask = reference_select(nll, ent, mask, SAMPLE_KEEP, TOKEN_KEEP)
        for j, i in enumerate(part):
            if keep[j]:
                n = stats[i][0].numel()
                pruned = mask[j, :n] & ~token_mask[j, :n]
                kept[i] = True
                labels[i] = [-100 if t > 0 and pruned[t - 1] else label for t, label in enumerate(rows[i]["labels"])]
    return labels


@pytest.mark.parametrize("window", [None, 8], ids=["whole-set", "windows-of-8"])
def test_kept_rows_and_pruned_labels_are_the_spec_of_full_logits_scores(model, rows, window):
    config = QTuningConfig(sample_keep_ratio=SAMPLE_KEEP, token_keep_ratio=TOKEN_KEEP, backend="torch")
    selection = select_dataset(model, rows, config, window=window, batch_size=5, progress=False)
    expected = reference_selection(model, rows, window or ROWS)

    assert [row.index for row in selection.report if row.kept] == sorted(expected)
    assert [row["labels"] for row in selection.train_rows] == [expected[i] for i in sorted(expected)]
    for row in selection.train_rows:
        source = next(r for r in rows if r["input_ids"] == row["input_ids"])
        assert row["attention_mask"] == source["attention_mask"]
    # what the check is worth: some kept rows were pruned and some kept whole, and others dropped
    pruned = [i for i in expected if expected[i] != rows[i]["labels"]]
    assert pruned and len(pruned) < len(expected) < ROWS - 1

    for row, source in zip(selection.report, rows):
        trainable = sum(label != -100 for label in source["labels"][1:])
        assert row.trainable_tokens == trainable and row.sample_key == sample_key(source["input_ids"])
        if row.kept:
            assert row.tokens_kept == (max(1, math.floor(TOKEN_KEEP * trainable)) if row.quadrant == "Q2" else trainable)
            assert row.quadrant in ("Q2", "Q4")
        else:
            assert row.tokens_kept == 0 and row.quadrant in (("Q1", "Q3", "middle") if trainable else ("",))


def test_windows_select_other_rows_than_the_whole_set(model, rows):
    """What makes the windowed case of the test above tell windows from the whole set."""
    config = QTuningConfig(sample_keep_ratio=SAMPLE_KEEP, token_keep_ratio=TOKEN_KEEP, backend="torch")
    whole = select_dataset(model, rows, config, batch_size=8, progress=False)
    windows = select_dataset(model, rows, config, window=8, batch_size=8, progress=False)
    assert [row.kept for row in whole.report] != [row.kept for row in windows.report]
    assert "windows of 8" in windows.table() and "whole set" in whole.table()


def test_a_window_below_one_is_refused(model, rows):
    with pytest.raises(ValueError, match="window: the rows triaged together, an integer >= 1"):
        select_dataset(model, rows, QTuningConfig(), window=0, progress=False)


def test_written_dataset_and_report(tmp_path, model, rows):
    from datasets import load_from_disk

    config = QTuningConfig(sample_keep_ratio=SAMPLE_KEEP, token_keep_ratio=TOKEN_KEEP, backend="torch")
    selection = select_dataset(model, rows, config, batch_size=8, sources=[("mine.jsonl", 100 + i) for i in range(ROWS)], progress=False)
    held_out = rows[:3]
    paths = write_selection(selection, str(tmp_path), eval_rows=held_out)

    written = load_from_disk(paths["dataset"])
    assert sorted(written) == ["train", "validation"]
    assert written["train"].column_names == ["input_ids", "attention_mask", "labels"]
    assert [dict(row) for row in written["train"]] == selection.train_rows
    assert [dict(row) for row in written["validation"]] == held_out

    with open(paths["report.csv"], encoding="utf-8") as handle:
        report = list(csv.DictReader(handle))
    assert list(report[0]) == [
        "index", "dataset", "dataset_row", "quadrant", "kept", "filled", "ppl", "ent",
        "trainable_tokens", "tokens_kept", "sample_key",
    ]
    assert [(r["index"], r["dataset"], r["dataset_row"]) for r in report] == [
        (str(i), "mine.jsonl", str(100 + i)) for i in range(ROWS)
    ]
    assert [r["quadrant"] for r in report] == [row.quadrant for row in selection.report]

    # a folder that is not empty is refused, unless overwrite; overwrite replaces what select wrote
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists and is not empty.*--overwrite"):
        write_selection(selection, str(tmp_path))
    write_selection(selection, str(tmp_path), overwrite=True)
    assert sorted(load_from_disk(paths["dataset"])) == ["train"]
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_rows_are_placed_in_their_dataset_of_origin_by_their_tokens():
    """Identical rows take their dataset's identical rows in order; a row found nowhere, or whose
    copies are all taken, has no origin."""
    datasets = [("a.jsonl", [[1, 2], [3], [1, 2]]), ("b.jsonl", [[4, 5], [3]])]
    rows = [[3], [1, 2], [1, 2], [3], [4, 5], [1, 2], [9]]
    assert match_origins(datasets, rows) == [
        ("a.jsonl", 1), ("a.jsonl", 0), ("a.jsonl", 2), ("b.jsonl", 1), ("b.jsonl", 0), ("", None), ("", None),
    ]

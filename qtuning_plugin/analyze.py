"""Where a dataset's samples fall on the EU plane, before training (framework-free part of
`axolotl qtuning analyze`; the Axolotl loading is `qtuning_plugin.axolotl.analyze`).

`score_dataset` scores every row of a tokenised dataset without gradient (the engine's
scoring forward, as in training); `analyze_scores` triages the scores at the
configured ratios in two ways:

* **whole set**: the scored samples as one mini-batch: where each sample stands in the
  dataset as a whole (the EU-plane picture and the ``quadrant`` column);
* **per mini-batch**: consecutive groups of the training run's mini-batch (the samples one
  triage sees) in dataset order (training shuffles, so the groups differ, but the proportions
  are what a run would see): the ``quadrant_per_batch`` column.

`write_outputs` writes ``samples.csv`` (one row per sample), ``summary.json`` and
``eu_plane.png``; `Analysis.table` is the quadrant table the command prints.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

import torch

from qtuning_plugin.atomic_files import atomic_write, write_json
from qtuning_plugin.config import QTuningConfig
from qtuning_plugin.core import sample_stats
from qtuning_plugin.core.select import triage_with_config
from qtuning_plugin.core.triage import NO_TARGET, QUADRANTS, Triage
from qtuning_plugin.engine import MicroBatch, QTuningEngine
from qtuning_plugin.history import EUPoint, triage_thresholds

ROWS = (*QUADRANTS, "")
ROW_NAMES = {
    "Q1": "Q1 harmful noise      (drop)",
    "Q2": "Q2 misconception      (keep, prune)",
    "Q3": "Q3 redundant          (drop)",
    "Q4": "Q4 calibration        (keep)",
    "middle": "middle band           (drop)",
    "": "no trainable token    (skip)",
}


class AnalysisError(Exception):
    """A problem with the config or the data, reported as one line by the CLI."""


@dataclass(frozen=True)
class Scores:
    """Per-sample statistics of a scored dataset, in dataset order."""

    ppl: list[float]  # perplexity, NaN without trainable tokens
    ent: list[float]  # mean predictive entropy in nats, NaN likewise
    tokens: list[int]  # trainable tokens
    # with `score_dataset(token_nll=True)`: each row's NLL at its trainable targets, in order
    # (``[tokens]``, as the scoring forward computed it), for token pruning
    token_nll: list[torch.Tensor] = field(default_factory=list)


@dataclass(frozen=True)
class SampleRow:
    """One row of ``samples.csv``."""

    index: int
    ppl: float
    log_ppl: float
    ent: float
    trainable_tokens: int
    quadrant: str  # whole-set triage: one of QUADRANTS, "" without trainable tokens
    filled: bool  # kept by the whole-set fill-up
    quadrant_per_batch: str  # per-mini-batch triage


@dataclass(frozen=True)
class QuadrantSummary:
    """One triage mode: samples per quadrant (``""``: no trainable token) and what is kept."""

    counts: dict[str, int]
    kept_sample_frac: float  # of the samples with trainable tokens
    trained_token_frac: float  # of all trainable tokens


@dataclass(frozen=True)
class WholeSetSummary(QuadrantSummary):
    alpha: float  # the last bisection iterate
    thresholds: dict[str, float]  # ppl_hi, ppl_lo, ent_lo, ent_hi


@dataclass(frozen=True)
class Analysis:
    """The outcome of `analyze_scores`."""

    rows: list[SampleRow]
    sample_keep_ratio: float
    token_keep_ratio: float
    mini_batch: int
    whole_set: WholeSetSummary
    per_mini_batch: QuadrantSummary

    def summary(self) -> dict[str, Any]:
        """The content of ``summary.json``."""
        return {
            "samples": len(self.rows),
            "sample_keep_ratio": self.sample_keep_ratio,
            "token_keep_ratio": self.token_keep_ratio,
            "mini_batch": self.mini_batch,
            "whole_set": asdict(self.whole_set),
            "per_mini_batch": asdict(self.per_mini_batch),
        }

    def table(self) -> str:
        """The quadrant table: one column per triage mode."""
        columns = {"whole set": self.whole_set, f"per mini-batch of {self.mini_batch}": self.per_mini_batch}
        return format_table(columns)


def _pad(rows: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad tokenised rows (``input_ids``, ``labels``, optional ``attention_mask``) into a batch."""
    width = max(len(row["input_ids"]) for row in rows)
    batch = {
        "input_ids": torch.full((len(rows), width), pad_token_id, dtype=torch.long),
        "labels": torch.full((len(rows), width), -100, dtype=torch.long),
        "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
    }
    for b, row in enumerate(rows):
        n = len(row["input_ids"])
        batch["input_ids"][b, :n] = torch.as_tensor(row["input_ids"])
        batch["labels"][b, :n] = torch.as_tensor(row["labels"])
        mask = row.get("attention_mask")
        batch["attention_mask"][b, :n] = torch.as_tensor(mask) if mask is not None else 1
    return batch


def score_dataset(
    model: torch.nn.Module,
    dataset: Any,
    config: QTuningConfig,
    *,
    batch_size: int,
    pad_token_id: int,
    progress: bool = True,
    token_nll: bool = False,
) -> Scores:
    """PPL, Ent and trainable-token count of every row of a tokenised dataset.

    The statistics are those of training's scoring forward (`QTuningEngine.score`, with the
    config's backend and chunk size), averaged over the trainable positions (``labels != -100``
    after the shift). ``token_nll`` also keeps each row's per-token NLL (4 bytes a trainable token).
    """
    from tqdm.auto import tqdm

    model.eval()
    device = next(model.parameters()).device
    engine = QTuningEngine(config, data_parallel=False)
    ppls: list[float] = []
    ents: list[float] = []
    tokens: list[int] = []
    nlls: list[torch.Tensor] = []
    starts = range(0, len(dataset), batch_size)
    for start in tqdm(starts, desc="qtuning: scoring", unit="batch", disable=not progress):
        rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = MicroBatch.prepare({key: value.to(device) for key, value in _pad(rows, pad_token_id).items()})
        nll, entropy = engine.score(model, batch)
        ppl, ent = sample_stats(nll, entropy, batch.mask)
        ppls += ppl.tolist()
        ents += ent.tolist()
        tokens += batch.mask.sum(dim=1).tolist()
        if token_nll:
            nlls += [row_nll[row_mask].cpu() for row_nll, row_mask in zip(nll, batch.mask)]
    return Scores(ppls, ents, tokens, nlls)


def triage_as_one_batch(ppl: Sequence[float], ent: Sequence[float], config: QTuningConfig) -> Triage:
    """`triage_samples` of the samples as one mini-batch; NaN statistics (no trainable token) take no part."""
    ppl_t = torch.tensor(ppl, dtype=torch.float64)
    ent_t = torch.tensor(ent, dtype=torch.float64)
    return triage_with_config(ppl_t, ent_t, ~(ppl_t.isnan() | ent_t.isnan()), config)


def quadrant_names(triage: Triage) -> list[str]:
    """Each sample's quadrant name, ``""`` without trainable tokens."""
    return ["" if index == NO_TARGET else QUADRANTS[index] for index in triage.quadrant.tolist()]


def summarise(labels: Sequence[str], tokens: Sequence[int], token_keep_ratio: float) -> QuadrantSummary:
    """Counts per quadrant, the kept sample fraction, and the fraction of trainable tokens trained on
    (Q4 samples whole, Q2 samples ``max(1, floor(r_token * L))`` tokens)."""
    counts = {row: sum(1 for label in labels if label == row) for row in ROWS}
    valid = len(labels) - counts[""]
    trained = sum(
        length if label == "Q4" else max(1, math.floor(token_keep_ratio * length))
        for label, length in zip(labels, tokens)
        if label in ("Q2", "Q4")
    )
    total = sum(length for label, length in zip(labels, tokens) if label)
    return QuadrantSummary(
        counts=counts,
        kept_sample_frac=(counts["Q2"] + counts["Q4"]) / valid if valid else 0.0,
        trained_token_frac=trained / total if total else 0.0,
    )


def format_table(columns: dict[str, QuadrantSummary]) -> str:
    """The quadrant table: one column per triage mode."""

    def cell(count: int, total: int) -> str:
        return f"{count:6d} ({100.0 * count / total:5.1f}%)" if total else f"{count:6d}"

    names = list(columns)
    width = 24
    lines = [f"{'':36s}" + "".join(f"{name:>{width}s}" for name in names)]
    totals = {name: sum(column.counts.values()) for name, column in columns.items()}
    for row in ROWS:
        lines.append(
            f"{ROW_NAMES[row]:36s}"
            + "".join(f"{cell(columns[name].counts[row], totals[name]):>{width}s}" for name in names)
        )
    lines.append(f"{'kept samples':36s}" + "".join(f"{columns[n].kept_sample_frac:>{width}.1%}" for n in names))
    lines.append(
        f"{'trained tokens (of trainable)':36s}"
        + "".join(f"{columns[n].trained_token_frac:>{width}.1%}" for n in names)
    )
    return "\n".join(lines)


def analyze_scores(
    scores: Scores, config: QTuningConfig, mini_batch: int, indices: Optional[Sequence[int]] = None
) -> Analysis:
    """Triage scored samples as one batch and per ``mini_batch`` consecutive samples.

    Raises:
        AnalysisError: no sample has a trainable token.
    """
    if not any(tokens > 0 for tokens in scores.tokens):
        raise AnalysisError("no sample of the dataset has a trainable token (every label is -100)")
    triage = triage_as_one_batch(scores.ppl, scores.ent, config)
    labels = quadrant_names(triage)
    batch_labels: list[str] = []
    for start in range(0, len(scores.ppl), mini_batch):
        part = slice(start, start + mini_batch)
        if any(tokens > 0 for tokens in scores.tokens[part]):
            batch_labels += quadrant_names(triage_as_one_batch(scores.ppl[part], scores.ent[part], config))
        else:
            batch_labels += [""] * len(scores.tokens[part])
    indices = list(indices) if indices is not None else list(range(len(scores.ppl)))
    rows = [
        SampleRow(index, ppl, math.log(ppl) if ppl == ppl else float("nan"), ent, tokens, label, fill, batch_label)
        for index, ppl, ent, tokens, label, fill, batch_label in zip(
            indices, scores.ppl, scores.ent, scores.tokens, labels, triage.filled.tolist(), batch_labels
        )
    ]
    whole = summarise(labels, scores.tokens, config.token_keep_ratio)
    return Analysis(
        rows=rows,
        sample_keep_ratio=config.sample_keep_ratio,
        token_keep_ratio=config.token_keep_ratio,
        mini_batch=mini_batch,
        whole_set=WholeSetSummary(**asdict(whole), alpha=triage.alpha, thresholds=triage_thresholds(triage)),
        per_mini_batch=summarise(batch_labels, scores.tokens, config.token_keep_ratio),
    )


def write_outputs(analysis: Analysis, out_dir: str) -> dict[str, str]:
    """``samples.csv``, ``summary.json`` and ``eu_plane.png`` into ``out_dir``; their paths."""
    from qtuning_plugin.plots import plot_eu_plane

    os.makedirs(out_dir, exist_ok=True)
    paths = {name: os.path.join(out_dir, name) for name in ("samples.csv", "summary.json", "eu_plane.png")}
    rows = [asdict(row) for row in analysis.rows]
    with atomic_write(paths["samples.csv"], newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_json(paths["summary.json"], analysis.summary(), indent=2)
    plot_eu_plane(
        [EUPoint(row.ppl, row.ent, row.quadrant, row.filled, step=0) for row in analysis.rows if row.quadrant],
        analysis.whole_set.thresholds,
        paths["eu_plane.png"],
        title=(
            f"Q-Tuning EU plane of the dataset, triaged as one batch "
            f"(sample keep {analysis.sample_keep_ratio:g}, token keep {analysis.token_keep_ratio:g})"
        ),
    )
    return paths

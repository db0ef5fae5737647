"""`axolotl qtuning analyze`: where a dataset's samples fall on the EU plane, before training.

Loads the model, tokenizer and training dataset exactly as an Axolotl config
says (Axolotl's own `load_cfg`, `load_datasets`, `load_tokenizer` and
`ModelLoader`: adapters, dtype, chat template, `val_set_size` split and
filters included), scores every sample of the training split without
gradient (fused statistics on the final hidden states, as the trainer does),
and triages at the configured ratios in two ways:

* **whole set**: the scored samples as one mini-batch: where each sample
  stands in the dataset as a whole (the EU-plane picture and the ``quadrant``
  column);
* **per mini-batch**: consecutive groups of ``micro_batch_size x world_size``
  rows in dataset order, as training triages (training shuffles, so the
  groups differ, but the proportions are what a run would see): the
  ``quadrant_per_batch`` column.

Writes into the output folder ``samples.csv`` (one row per sample),
``eu_plane.png`` and ``summary.json``, and prints the quadrant table.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from qtuning_plugin.config import QTuningConfig
from qtuning_plugin.core import sample_stats, triage_samples
from qtuning_plugin.history import QUADRANTS, quadrant_labels

ROWS = ("Q1", "Q2", "Q3", "Q4", "middle", "")
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


@dataclass
class Scores:
    """Per-sample statistics of a scored dataset, in dataset order."""

    ppl: list[float]
    ent: list[float]
    tokens: list[int]


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


@torch.no_grad()
def score_dataset(
    model: torch.nn.Module,
    dataset: Any,
    *,
    batch_size: int,
    pad_token_id: int,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    progress: bool = True,
) -> Scores:
    """PPL, Ent and trainable-token count of every row of a tokenised dataset.

    The statistics are those of the trainer's scoring pass: final hidden
    states through the fused LM-head op (`token_stats`), averaged over the
    trainable positions (``labels != -100`` after the shift).
    """
    from tqdm.auto import tqdm

    from qtuning_plugin.modeling import final_hidden_states, lm_head_parameters, shifted_targets, unwrap_causal_lm
    from qtuning_plugin.ops.backends import resolve_backend

    model.eval()
    device = next(model.parameters()).device
    weight, bias = lm_head_parameters(unwrap_causal_lm(model))
    ops = resolve_backend(backend, device)
    scores = Scores([], [], [])
    starts = range(0, len(dataset), batch_size)
    for start in tqdm(starts, desc="qtuning: scoring", unit="batch", disable=not progress):
        rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = {key: value.to(device) for key, value in _pad(rows, pad_token_id).items()}
        hidden = final_hidden_states(model, batch)
        targets = shifted_targets(batch["labels"])
        mask = targets != -100
        nll, entropy = ops.token_stats(
            hidden.flatten(0, 1), weight, targets.flatten(), bias=bias, chunk_size=chunk_size
        )
        ppl, ent = sample_stats(nll.view(targets.shape), entropy.view(targets.shape), mask)
        scores.ppl += ppl.tolist()
        scores.ent += ent.tolist()
        scores.tokens += mask.sum(dim=1).tolist()
    return scores


def triage_labels(
    ppl: Sequence[float], ent: Sequence[float], config: QTuningConfig
) -> tuple[list[str], list[bool], Any]:
    """Triage the samples as one mini-batch: ``(quadrant labels, fill-up flags, Triage)``."""
    ppl_t = torch.tensor(ppl, dtype=torch.float64)
    ent_t = torch.tensor(ent, dtype=torch.float64)
    valid = ~(ppl_t.isnan() | ent_t.isnan())
    triage = triage_samples(
        ppl_t.nan_to_num(0.0),
        ent_t.nan_to_num(0.0),
        config.sample_keep_ratio,
        max_iters=config.max_bisect_iters,
        tol=config.bisect_tolerance,
        valid=valid,
    )
    labels, filled = quadrant_labels(ppl, ent, triage.keep.tolist(), triage.q2.tolist(), triage)
    return labels, filled, triage


def summarise(labels: Sequence[str], tokens: Sequence[int], token_keep_ratio: float) -> dict[str, Any]:
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
    return {
        "counts": counts,
        "kept_sample_frac": (counts["Q2"] + counts["Q4"]) / valid if valid else 0.0,
        "trained_token_frac": trained / total if total else 0.0,
    }


def format_table(columns: dict[str, dict[str, Any]]) -> str:
    """The quadrant table: one column per triage mode."""

    def cell(count: int, total: int) -> str:
        return f"{count:6d} ({100.0 * count / total:5.1f}%)" if total else f"{count:6d}"

    names = list(columns)
    width = 24
    lines = [f"{'':36s}" + "".join(f"{name:>{width}s}" for name in names)]
    totals = {name: sum(column["counts"].values()) for name, column in columns.items()}
    for row in ROWS:
        lines.append(
            f"{ROW_NAMES[row]:36s}"
            + "".join(f"{cell(columns[name]['counts'][row], totals[name]):>{width}s}" for name in names)
        )
    lines.append(f"{'kept samples':36s}" + "".join(f"{columns[n]['kept_sample_frac']:>{width}.1%}" for n in names))
    lines.append(
        f"{'trained tokens (of trainable)':36s}"
        + "".join(f"{columns[n]['trained_token_frac']:>{width}.1%}" for n in names)
    )
    return "\n".join(lines)


def analyze_scores(
    scores: Scores, config: QTuningConfig, mini_batch: int, indices: Optional[Sequence[int]] = None
) -> dict[str, Any]:
    """Triage scored samples both ways; the per-sample rows and the summary."""
    if not any(tokens > 0 for tokens in scores.tokens):
        raise AnalysisError("no sample of the dataset has a trainable token (every label is -100)")
    labels, filled, triage = triage_labels(scores.ppl, scores.ent, config)
    batch_labels: list[str] = []
    for start in range(0, len(scores.ppl), mini_batch):
        part = slice(start, start + mini_batch)
        if any(tokens > 0 for tokens in scores.tokens[part]):
            batch_labels += triage_labels(scores.ppl[part], scores.ent[part], config)[0]
        else:
            batch_labels += [""] * len(scores.tokens[part])
    indices = list(indices) if indices is not None else list(range(len(scores.ppl)))
    rows = [
        {
            "index": index,
            "ppl": ppl,
            "log_ppl": math.log(ppl) if ppl == ppl else float("nan"),
            "ent": ent,
            "trainable_tokens": tokens,
            "quadrant": label,
            "filled": fill,
            "quadrant_per_batch": batch_label,
        }
        for index, ppl, ent, tokens, label, fill, batch_label in zip(
            indices, scores.ppl, scores.ent, scores.tokens, labels, filled, batch_labels
        )
    ]
    thresholds = {name: getattr(triage, name) for name in ("ppl_hi", "ppl_lo", "ent_lo", "ent_hi")}
    summary = {
        "samples": len(rows),
        "sample_keep_ratio": config.sample_keep_ratio,
        "token_keep_ratio": config.token_keep_ratio,
        "mini_batch": mini_batch,
        "whole_set": {**summarise(labels, scores.tokens, config.token_keep_ratio), "alpha": triage.alpha,
                      "thresholds": thresholds},
        "per_mini_batch": summarise(batch_labels, scores.tokens, config.token_keep_ratio),
    }
    return {"rows": rows, "summary": summary}


def write_outputs(result: dict[str, Any], out_dir: str) -> dict[str, str]:
    """``samples.csv``, ``summary.json`` and ``eu_plane.png`` into ``out_dir``; their paths."""
    from qtuning_plugin.plots import plot_eu_plane

    os.makedirs(out_dir, exist_ok=True)
    paths = {name: os.path.join(out_dir, name) for name in ("samples.csv", "summary.json", "eu_plane.png")}
    rows = result["rows"]
    with open(paths["samples.csv"], "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(paths["summary.json"], "w", encoding="utf-8") as handle:
        json.dump(result["summary"], handle, indent=2)
    summary = result["summary"]
    points = [[row["ppl"], row["ent"], row["quadrant"], row["filled"]] for row in rows if row["quadrant"] in QUADRANTS]
    plot_eu_plane(
        points,
        summary["whole_set"]["thresholds"],
        paths["eu_plane.png"],
        title=(
            f"Q-Tuning EU plane of the dataset, triaged as one batch "
            f"(sample keep {summary['sample_keep_ratio']:g}, token keep {summary['token_keep_ratio']:g})"
        ),
    )
    return paths


def run(config_path: str, *, max_samples: Optional[int] = None, out_dir: Optional[str] = None,
        progress: bool = True) -> dict[str, Any]:
    """The whole `analyze` command: load through Axolotl, score, triage, write; returns the result
    with ``paths`` and ``table`` added. Raises `AnalysisError` for config and data problems."""
    import yaml

    with open(config_path, encoding="utf-8") as handle:
        raw = yaml.safe_load(handle)
    if not isinstance(raw, dict) or "qtuning" not in raw:
        raise AnalysisError(
            f"{config_path} has no `qtuning:` section; add one (and `plugins: [qtuning_plugin.QTuningPlugin]`) "
            "to set the ratios to analyze at"
        )
    try:
        config = QTuningConfig.model_validate(raw["qtuning"] or {})
    except ValueError as error:
        raise AnalysisError(f"invalid `qtuning:` section: {' '.join(str(error).split())}") from None

    from axolotl.cli.config import load_cfg
    from axolotl.common.datasets import load_datasets
    from axolotl.loaders import ModelLoader, load_tokenizer

    try:
        cfg = load_cfg(config_path)
    except ValueError as error:  # pydantic's ValidationError included
        raise AnalysisError(f"invalid Axolotl config: {' '.join(str(error).split())}") from None
    try:
        dataset = load_datasets(cfg=cfg).train_dataset
    except ValueError as error:  # e.g. Axolotl dropped every sample for having no trainable token
        raise AnalysisError(f"could not load the training dataset: {' '.join(str(error).split())}") from None
    if dataset is None or len(dataset) == 0:
        raise AnalysisError("the training dataset is empty")
    if max_samples is not None and max_samples < len(dataset):
        dataset = dataset.select(range(max_samples))
    tokenizer = load_tokenizer(cfg)
    model, _ = ModelLoader(cfg, tokenizer).load()

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    micro = int(cfg.micro_batch_size or 1)
    scores = score_dataset(
        model, dataset, batch_size=micro, pad_token_id=pad, backend=config.backend,
        chunk_size=config.chunk_size, progress=progress,
    )
    mini_batch = micro * int(cfg.world_size or 1)
    result = analyze_scores(scores, config, mini_batch)
    out_dir = out_dir or os.path.join(cfg.output_dir or ".", "qtuning-analysis")
    result["paths"] = write_outputs(result, out_dir)
    summary = result["summary"]
    result["table"] = format_table(
        {"whole set": summary["whole_set"], f"per mini-batch of {mini_batch}": summary["per_mini_batch"]}
    )
    return result

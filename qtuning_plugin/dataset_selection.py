"""A whole-dataset selection before training (framework-free part of `axolotl qtuning select`; the
Axolotl loading is `qtuning_plugin.axolotl.select`).

`select_dataset` scores every row of a tokenised dataset once with the model (`analyze`'s scoring:
training's scoring forward, without gradient), triages the rows as one mini-batch, or in
consecutive windows of ``window`` rows, at the config's ``sample_keep_ratio`` (Algorithm 1 and the
fill-up, `triage_samples`), and prunes the tokens of each kept Q2 row at ``token_keep_ratio``
(eq. 7, `prune_tokens`). `write_selection` writes the kept rows as a pre-tokenized dataset
(``input_ids``, ``attention_mask``, ``labels`` with -100 on the pruned tokens) that Axolotl and
LLaMA-Factory load as they are, and a per-row report. Training on it is plain SFT on the kept rows
and tokens: the selection happened once, before training, with the model as it was then.
"""

from __future__ import annotations

import csv
import os
import shutil
from collections import defaultdict, deque
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Optional, Sequence

import torch

from qtuning_plugin.analyze import (
    AnalysisError,
    QuadrantSummary,
    Scores,
    format_table,
    quadrant_names,
    score_dataset,
    summarise,
    triage_as_one_batch,
)
from qtuning_plugin.atomic_files import atomic_write
from qtuning_plugin.config import QTuningConfig
from qtuning_plugin.core import prune_tokens
from qtuning_plugin.modeling import shifted_targets
from qtuning_plugin.sample_key import sample_key

#: The columns of the written dataset: what Axolotl takes as pre-tokenized and LLaMA-Factory's SFT reads.
COLUMNS = ("input_ids", "attention_mask", "labels")
#: What `write_selection` writes into its folder (and replaces with ``overwrite``).
DATASET_DIR, REPORT = "dataset", "report.csv"
TRAIN_SPLIT, EVAL_SPLIT = "train", "validation"


@dataclass(frozen=True)
class ReportRow:
    """One row of ``report.csv``: one row of the scored dataset."""

    index: int  # in the scored dataset
    dataset: str  # the dataset it came from ("" where not known)
    dataset_row: Optional[int]  # its index there (None where not known)
    quadrant: str  # one of QUADRANTS, "" without trainable tokens
    kept: bool
    filled: bool  # kept by the fill-up
    ppl: float
    ent: float
    trainable_tokens: int
    tokens_kept: int  # trainable tokens left in the written labels (0 if dropped)
    sample_key: str  # `qtuning_plugin.sample_key.sample_key` of its input_ids


@dataclass(frozen=True)
class DatasetSelection:
    """The outcome of `select_dataset`.

    Attributes:
        report: every scored row, in dataset order.
        train_rows: the kept rows in dataset order, each ``{input_ids, attention_mask, labels}``
            (lists of ints), labels -100 on the pruned tokens of Q2 rows.
        window: the rows triaged together (None: the whole dataset as one set).
        summary: counts per quadrant and kept fractions over every window.
    """

    report: list[ReportRow]
    train_rows: list[dict[str, list[int]]]
    sample_keep_ratio: float
    token_keep_ratio: float
    window: Optional[int]
    summary: QuadrantSummary

    def table(self) -> str:
        """The quadrant table of the selection."""
        name = "whole set" if self.window is None else f"windows of {self.window}"
        return format_table({name: self.summary})


def check_window(window: Optional[int]) -> None:
    if window is not None and window < 1:
        raise ValueError(f"window: the rows triaged together, an integer >= 1 (or None: all of them); got {window}")


def select_dataset(
    model: torch.nn.Module,
    dataset: Any,
    config: QTuningConfig,
    *,
    window: Optional[int] = None,
    batch_size: int = 8,
    pad_token_id: int = 0,
    sources: Optional[Sequence[tuple[str, Optional[int]]]] = None,
    progress: bool = True,
) -> DatasetSelection:
    """Score a tokenised dataset with ``model`` and select from it as Q-Tuning would, once.

    Args:
        model: a causal LM (transformers, PEFT-wrapped or not), on the device to score on.
        dataset: rows with ``input_ids`` and ``labels`` (-100 where untrained) and optionally
            ``attention_mask``, unpadded: a `datasets.Dataset` or a list of dicts.
        config: the ratios, ``context_weight``, ``prune_highest_scores``, the bisection settings,
            ``backend`` and ``chunk_size`` (the other keys play no part here).
        window: triage consecutive windows of this many rows, each on its own (None: all rows at once).
        batch_size: rows per scoring forward.
        pad_token_id: the padding of the scoring batches.
        sources: each row's (dataset, index there) for the report; by default ("", its index).
        progress: show a progress bar while scoring.

    Raises:
        ValueError: ``window`` below 1.
        AnalysisError: no row has a trainable token.
    """
    check_window(window)
    scores = score_dataset(
        model, dataset, config, batch_size=batch_size, pad_token_id=pad_token_id, progress=progress, token_nll=True
    )
    return select_scored(dataset, scores, config, window=window, sources=sources)


def select_scored(
    dataset: Any,
    scores: Scores,
    config: QTuningConfig,
    *,
    window: Optional[int] = None,
    sources: Optional[Sequence[tuple[str, Optional[int]]]] = None,
) -> DatasetSelection:
    """`select_dataset` from scores already computed (``score_dataset(..., token_nll=True)``)."""
    check_window(window)
    if len(scores.token_nll) != len(dataset):
        raise ValueError("select_scored needs the per-token NLL of every row: score_dataset(..., token_nll=True)")
    if not any(tokens > 0 for tokens in scores.tokens):
        raise AnalysisError("no row of the dataset has a trainable token (every label is -100)")
    size = window or len(dataset)
    quadrants: list[str] = []
    kept: list[bool] = []
    q2: list[bool] = []
    filled: list[bool] = []
    for start in range(0, len(dataset), size):
        part = slice(start, start + size)
        if any(tokens > 0 for tokens in scores.tokens[part]):
            triage = triage_as_one_batch(scores.ppl[part], scores.ent[part], config)
            quadrants += quadrant_names(triage)
            kept += triage.keep.tolist()
            q2 += triage.q2.tolist()
            filled += triage.filled.tolist()
        else:
            rows = len(scores.tokens[part])
            quadrants += [""] * rows
            kept += [False] * rows
            q2 += [False] * rows
            filled += [False] * rows

    sources = sources if sources is not None else [("", index) for index in range(len(dataset))]
    report: list[ReportRow] = []
    train_rows: list[dict[str, list[int]]] = []
    for index in range(len(dataset)):
        row = dataset[index]
        input_ids = torch.as_tensor(row["input_ids"]).tolist()
        labels = torch.as_tensor(row["labels"]).tolist()
        if q2[index]:
            labels = pruned_labels(labels, scores.token_nll[index], config)
        tokens_kept = sum(label != -100 for label in labels[1:]) if kept[index] else 0
        if kept[index]:
            mask = row.get("attention_mask")
            train_rows.append(
                {
                    "input_ids": input_ids,
                    "attention_mask": torch.as_tensor(mask).tolist() if mask is not None else [1] * len(input_ids),
                    "labels": labels,
                }
            )
        name, source_row = sources[index]
        report.append(
            ReportRow(
                index=index,
                dataset=name,
                dataset_row=source_row,
                quadrant=quadrants[index],
                kept=kept[index],
                filled=filled[index],
                ppl=scores.ppl[index],
                ent=scores.ent[index],
                trainable_tokens=scores.tokens[index],
                tokens_kept=tokens_kept,
                sample_key=sample_key(input_ids),
            )
        )
    return DatasetSelection(
        report=report,
        train_rows=train_rows,
        sample_keep_ratio=config.sample_keep_ratio,
        token_keep_ratio=config.token_keep_ratio,
        window=window,
        summary=summarise(quadrants, scores.tokens, config.token_keep_ratio),
    )


def match_origins(
    datasets: Iterable[tuple[str, Iterable[Sequence[int]]]], rows: Iterable[Sequence[int]]
) -> list[tuple[str, Optional[int]]]:
    """Each row's dataset of origin and index there, found by the key of its tokens.

    Args:
        datasets: ``(name, each row's input_ids)`` of the datasets the rows were drawn from, as
            tokenised before a host merged, shuffled and filtered them.
        rows: the input_ids of the rows to place.

    Returns:
        Per row, the first row of ``datasets`` with the same tokens that no earlier row took
        (identical rows are told apart by order only); ``("", None)`` where none is left.
    """
    origins: dict[str, deque[tuple[str, int]]] = defaultdict(deque)
    for name, dataset_rows in datasets:
        for index, input_ids in enumerate(dataset_rows):
            origins[sample_key(input_ids)].append((name, index))
    found = []
    for input_ids in rows:
        left = origins.get(sample_key(input_ids))
        found.append(left.popleft() if left else ("", None))
    return found


def pruned_labels(labels: list[int], nll: torch.Tensor, config: QTuningConfig) -> list[int]:
    """A Q2 row's labels with -100 on its pruned tokens (`prune_tokens` at ``token_keep_ratio``).

    ``nll`` holds the row's NLL at its trainable targets (``labels[t + 1]`` is the target at t).
    """
    targets = shifted_targets(torch.tensor([labels]))
    mask = targets != -100
    row_nll = torch.zeros(mask.shape, dtype=nll.dtype)
    row_nll[mask] = nll
    keep = prune_tokens(
        row_nll,
        mask,
        torch.ones(1, dtype=torch.bool),
        config.token_keep_ratio,
        context_weight=config.context_weight,
        prune_highest=config.prune_highest_scores,
    )
    pruned = (mask & ~keep)[0, :-1]
    out = torch.tensor(labels)
    out[1:] = out[1:].masked_fill(pruned, -100)
    return out.tolist()


def check_out_dir(out_dir: str, overwrite: bool) -> None:
    """Refuse an output folder that exists and is not empty, unless ``overwrite``."""
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise FileExistsError(
            f"the output folder {out_dir} exists and is not empty: choose another one (--out), or pass "
            f"--overwrite (overwrite=True) to replace the {DATASET_DIR}/ and {REPORT} that select writes there"
        )
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise FileExistsError(f"the output folder {out_dir} is a file")


def write_selection(
    selection: DatasetSelection, out_dir: str, *, eval_rows: Any = None, overwrite: bool = False
) -> dict[str, str]:
    """Write ``dataset/`` and ``report.csv`` into ``out_dir``; their paths.

    ``dataset/`` is a `datasets.DatasetDict` saved with ``save_to_disk``: ``train`` holds the kept
    rows, and ``validation`` ``eval_rows`` (held-out rows, unselected) where given; each with the
    `COLUMNS` only. With ``overwrite``, what an earlier selection wrote there is replaced; other
    files in ``out_dir`` are left as they are.
    """
    from datasets import Dataset, DatasetDict, Features, Value
    from datasets import Sequence as ListOf

    check_out_dir(out_dir, overwrite)
    os.makedirs(out_dir, exist_ok=True)
    paths = {DATASET_DIR: os.path.join(out_dir, DATASET_DIR), REPORT: os.path.join(out_dir, REPORT)}
    features = Features({column: ListOf(Value("int64")) for column in COLUMNS})

    def as_dataset(rows: Any) -> Dataset:
        rows = [rows[i] for i in range(len(rows))]
        columns = {column: [torch.as_tensor(row[column]).tolist() for row in rows] for column in COLUMNS}
        return Dataset.from_dict(columns, features=features)

    splits = {TRAIN_SPLIT: as_dataset(selection.train_rows)}
    if eval_rows is not None and len(eval_rows):
        splits[EVAL_SPLIT] = as_dataset(eval_rows)
    if os.path.isdir(paths[DATASET_DIR]):
        shutil.rmtree(paths[DATASET_DIR])
    DatasetDict(splits).save_to_disk(paths[DATASET_DIR])
    rows = [asdict(row) for row in selection.report]
    with atomic_write(paths[REPORT], newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return paths


def axolotl_lines(dataset_dir: str, *, with_eval: bool) -> str:
    """The Axolotl config lines that train on a written selection."""
    path = os.path.abspath(dataset_dir)
    lines = [
        "datasets:",
        f"  - path: {path}    # pre-tokenized: the kept rows, -100 on the pruned tokens",
    ]
    if with_eval:
        lines += ["test_datasets:", f"  - path: {path}", f"    split: {EVAL_SPLIT}    # the config's held-out rows"]
    lines += [
        "val_set_size: 0",
        "qtuning:",
        "  enabled: false    # the rows are selected already: train on every kept row and token",
    ]
    return "\n".join(lines)


def llamafactory_lines(dataset_dir: str) -> str:
    """The LLaMA-Factory config lines that train on a written selection."""
    return "\n".join(
        [
            f"tokenized_path: {os.path.abspath(dataset_dir)}    # loaded as is: the other data arguments are "
            "ignored (`dataset:` is still required)",
            "# and no `qtuning:` section (or `enabled: false` in it): the rows are selected already",
        ]
    )

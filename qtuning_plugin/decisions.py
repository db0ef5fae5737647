"""``log_decisions``: what every triage decided about every sample, one JSON line each, in
``output_dir/qtuning_decisions.jsonl``.

`DecisionLog` listens to the engine's `SelectionEvent`s: each triage's samples with a trainable
token, on every rank, are gathered to every rank in rank order (a collective, as the triage's own
gather is), and the main process appends their lines in one write. A line reads

    {"step": 12, "key": "3f9a0c1d5e7b2a64", "quadrant": "Q2", "ppl": 7.91, "ent": 1.23,
     "trainable_tokens": 41, "kept_tokens": 20, "filled": false}

``step`` is the optimizer step (1-based); ``key`` is `qtuning_plugin.sample_key.sample_key` of the
sample's own token ids (a packed row's samples each get their own), the key to join the lines with
the user's data, since none of the hosts passes a row index to the trainer; ``quadrant`` is one of
`QUADRANTS` (kept: Q2, Q4); ``filled`` marks a sample kept by the fill-up. Warm-up steps are
not triaged and write nothing.

`DecisionLog.restart` at the start of training keeps the lines of the steps up to the one the run
starts from (none for a fresh run): a run resumed from a checkpoint then ends with the file of
the uninterrupted run. Lines are written with `qtuning_plugin.atomic_files`, so a kill cuts the
file at most within its last line, which the next append or restart removes.
"""

from __future__ import annotations

import json
import os

import torch
from torch import Tensor

from qtuning_plugin.atomic_files import append_jsonl, read_jsonl, write_text
from qtuning_plugin.core.triage import NO_TARGET, QUADRANTS
from qtuning_plugin.distributed import all_gather_padded, world_size
from qtuning_plugin.engine import SelectionEvent
from qtuning_plugin.sample_key import KEY_HEX_DIGITS, sample_key

DECISIONS_NAME = "qtuning_decisions.jsonl"

# One int64 row per sample for the gather; PPL and Ent travel as the bits of their float64.
KEY, QUADRANT, TRAINABLE, KEPT, FILLED, PPL, ENT = range(7)
KEY_RANGE = 1 << (4 * KEY_HEX_DIGITS)  # a key is a 64-bit number, stored as a signed int64


def _key_as_int64(key: str) -> int:
    value = int(key, 16)
    return value - KEY_RANGE if value >= KEY_RANGE // 2 else value


def _int64_as_key(value: int) -> str:
    return f"{value % KEY_RANGE:0{KEY_HEX_DIGITS}x}"


def decision_rows(event: SelectionEvent) -> Tensor:
    """``[S, 7]`` int64 on the CPU: this rank's samples of the triage that have a trainable token,
    in the selection's order (micro-batch after micro-batch)."""
    selection = event.selection
    trainable = torch.cat([batch.per_sample(batch.mask, False).sum(dim=1) for batch in event.micro_batches])
    columns = [
        torch.tensor([_key_as_int64(sample_key(ids.cpu())) for ids in event.sample_input_ids], dtype=torch.int64),
        selection.quadrant.cpu(),
        trainable.cpu(),
        selection.token_mask.sum(dim=1).cpu(),
        selection.filled.cpu(),
        selection.ppl.double().cpu().view(torch.int64),
        selection.ent.double().cpu().view(torch.int64),
    ]
    rows = torch.stack([column.to(torch.int64) for column in columns], dim=1)
    return rows[rows[:, QUADRANT] != NO_TARGET]


def decision_lines(step: int, rows: Tensor) -> list[dict]:
    """The JSON lines of `decision_rows` rows (any ranks')."""
    ppl, ent = rows[:, PPL].view(torch.float64).tolist(), rows[:, ENT].view(torch.float64).tolist()
    return [
        {
            "step": step,
            "key": _int64_as_key(row[KEY]),
            "quadrant": QUADRANTS[row[QUADRANT]],
            "ppl": ppl[i],
            "ent": ent[i],
            "trainable_tokens": row[TRAINABLE],
            "kept_tokens": row[KEPT],
            "filled": bool(row[FILLED]),
        }
        for i, row in enumerate(rows.tolist())
    ]


class DecisionLog:
    """The engine listener behind ``log_decisions`` (see the module docstring).

    Args:
        output_dir: where ``qtuning_decisions.jsonl`` goes.
        main_process: whether this process writes the file (every process gathers).
        data_parallel: gather every rank's samples when a process group of several ranks runs
            (as the engine's ``data_parallel``).
    """

    def __init__(self, output_dir: str, main_process: bool, data_parallel: bool = True):
        self.path = os.path.join(output_dir, DECISIONS_NAME)
        self.main_process = main_process
        self.data_parallel = data_parallel

    def record_event(self, event: SelectionEvent) -> None:
        if event.selection is None:  # warm-up: nothing was triaged
            return
        rows = decision_rows(event)
        if self.data_parallel and world_size() > 1:
            # The collective runs where the engine's tensors are (NCCL needs them on the GPU).
            rows = torch.cat(all_gather_padded(rows.to(event.selection.ppl.device))).cpu()
        if self.main_process and rows.shape[0]:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            append_jsonl(self.path, *decision_lines(event.step, rows))

    def restart(self, step: int) -> None:
        """Training starts after optimizer step ``step`` (0: afresh): keep only the lines of the
        steps up to it, as a run that was never interrupted would have them (main process)."""
        if not (self.main_process and os.path.isfile(self.path)):
            return
        kept = [line for line in read_jsonl(self.path) if line["step"] <= step]
        if kept:
            write_text(self.path, "".join(json.dumps(line) + "\n" for line in kept))
        else:
            os.remove(self.path)

"""Step-scope triage: the training passes of one optimizer step, planned from what triage kept.

With ``triage_scope: step`` the mini-batch of SPEC section 4 is the optimizer step's: every
gradient-accumulation micro-batch on every data-parallel rank. Once the step is scored and
triaged, its rows that hold a kept token (`RowTable`) are regrouped into training passes of at
most ``rows_per_pass`` rows (`plan_passes`), padding trimmed, so the number of forward/backward
passes falls with ``sample_keep_ratio``. The loss of the step is the cross-entropy summed over
all kept tokens of the step divided by their count (all ranks): each pass carries its share
through ``loss_scale``.

Data parallel: the kept rows of every rank are gathered (token ids and masks only, a few
integers per token) and dealt out again so that every rank runs the same number of passes
(DDP and ZeRO all-reduce once per pass, so unequal counts would hang) and none idles while
another has rows to train on. Dealing rows round-robin in order of decreasing length also
evens out the tokens per rank and puts rows of similar length into the same pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from qtuning_plugin.distributed import all_gather_padded, world_size

# Row-aligned ``[B, T]`` inputs carried into the training passes, and their padding values.
ROW_KEYS = ("input_ids", "attention_mask", "position_ids", "token_type_ids", "labels")
_PAD = {"labels": -100, "targets": -100}

#: Key of the training-pass entry in the micro-batches handed back to the Trainer.
PASS_KEY = "qtuning_pass"
#: The entry of a micro-batch slot that runs no pass (the step has fewer passes than micro-batches).
NO_PASS = "no pass"


@dataclass(frozen=True)
class TrainingPass:
    """What one forward/backward of a triaged step trains on, beside its model inputs.

    Attributes:
        targets: ``[R, T]`` int64 next-token targets (shifted labels), -100 where untrained.
        token_mask: ``[R, T]`` bool, the kept tokens.
        loss_scale: multiplies the pass's summed cross-entropy (nats): world size / kept tokens
            of the whole step on all ranks, so that the mean over ranks of the summed pass losses
            is the step's mean cross-entropy over its kept tokens; 0 when nothing is kept.
    """

    targets: Tensor
    token_mask: Tensor
    loss_scale: float


@dataclass(frozen=True)
class RowTable:
    """Rows of a step as one integer tensor, so that they travel between ranks in one collective.

    Attributes:
        columns: the name of each channel: some of `ROW_KEYS`, then ``targets`` and ``token_mask``.
        values: ``[K, L, C]`` int64, row k's channel c at position t; past a row's length, the
            channel's padding value (-100 for labels and targets, else 0).
        lengths: ``[K]`` int64, the positions in use of each row (right padding trimmed).
    """

    columns: tuple[str, ...]
    values: Tensor
    lengths: Tensor

    @property
    def num_rows(self) -> int:
        return self.values.shape[0]

    def kept_tokens(self) -> int:
        return int(self.values[..., self.columns.index("token_mask")].sum())

    def padded_to(self, length: int) -> "RowTable":
        """The same rows with ``length`` positions (>= the current one)."""
        rows, current, channels = self.values.shape
        if length == current:
            return self
        fill = torch.tensor([_PAD.get(c, 0) for c in self.columns], dtype=self.values.dtype, device=self.values.device)
        tail = fill.expand(rows, length - current, channels)
        return RowTable(self.columns, torch.cat([self.values, tail], dim=1), self.lengths)

    def gather(self) -> "RowTable":
        """Every rank's rows, in rank order (a collective: every rank must call it)."""
        values = all_gather_padded(self.values)
        lengths = all_gather_padded(self.lengths)
        length = max(v.shape[1] for v in values)
        parts = [RowTable(self.columns, v, n).padded_to(length) for v, n in zip(values, lengths)]
        return RowTable(self.columns, torch.cat([p.values for p in parts]), torch.cat(lengths))

    def rows(self, index: list[int], drop_tokens: bool = False) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """Rows ``index`` trimmed to the longest of them: ``(model inputs, targets, token_mask)``.

        ``drop_tokens`` clears the token mask (a pass that must run for the collectives but
        trains on nothing).
        """
        length = max(1, int(self.lengths[index].max()))
        block = self.values[index, :length]
        columns = {name: block[..., c] for c, name in enumerate(self.columns)}
        token_mask = columns.pop("token_mask").bool()
        if drop_tokens:
            token_mask = torch.zeros_like(token_mask)
        targets = columns.pop("targets")
        return columns, targets, token_mask


def used_length(inputs: dict[str, Any], batch: int, length: int) -> Tensor:
    """``[B]`` int64: each row's positions up to its last attended one (all of them without a mask)."""
    mask = inputs.get("attention_mask")
    if mask is None or mask.dim() != 2:
        return torch.full((batch,), length, dtype=torch.long)
    positions = torch.arange(1, length + 1, device=mask.device)
    return (mask.ne(0) * positions).amax(dim=1).clamp(min=1).cpu()


def row_table(inputs: dict[str, Any], targets: Tensor, token_mask: Tensor, rows: Tensor) -> RowTable:
    """The rows ``rows`` (``[k]`` int64) of one micro-batch as a `RowTable`.

    Args:
        inputs: the micro-batch, ``[B, T]`` tensors under (some of) `ROW_KEYS`.
        targets: ``[B, T]`` int64 shifted labels.
        token_mask: ``[B, T]`` bool, the kept tokens.
    """
    batch, length = targets.shape
    columns = [key for key in ROW_KEYS if torch.is_tensor(inputs.get(key)) and inputs[key].shape == (batch, length)]
    channels = [inputs[key].long() for key in columns] + [targets, token_mask.long()]
    values = torch.stack(channels, dim=-1)[rows]
    lengths = used_length(inputs, batch, length).to(rows.device)[rows]
    table = RowTable((*columns, "targets", "token_mask"), values, lengths)
    width = int(lengths.max()) if rows.numel() else 0
    return RowTable(table.columns, table.values[:, :width], table.lengths)


def concat(tables: list[RowTable]) -> RowTable:
    """The rows of several tables (same columns) in order."""
    length = max(t.values.shape[1] for t in tables)
    padded = [t.padded_to(length) for t in tables]
    return RowTable(tables[0].columns, torch.cat([t.values for t in padded]), torch.cat([t.lengths for t in padded]))


def plan_passes(lengths: list[int], world: int, rank: int, rows_per_pass: int) -> list[list[int]]:
    """Deal K kept rows out to ``world`` ranks and group this rank's into passes.

    Rows are dealt round-robin in order of decreasing length (ties: lower index first); every
    rank gets ``P = max(1, ceil(ceil(K / world) / rows_per_pass))`` passes, its rows split into
    P contiguous groups whose sizes differ by at most one (so none exceeds ``rows_per_pass``).
    A group is empty only where this rank has fewer rows than passes.

    Returns:
        P lists of row indices (into ``lengths``) for ``rank``.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    share = order[rank::world]
    passes = max(1, math.ceil(math.ceil(len(lengths) / world) / rows_per_pass))
    size, extra = divmod(len(share), passes)
    groups, start = [], 0
    for p in range(passes):
        end = start + size + (1 if p < extra else 0)
        groups.append(share[start:end])
        start = end
    return groups


def plan_step(local: RowTable, rows_per_pass: int, fallback: RowTable) -> list[dict[str, Any]]:
    """This rank's training passes of a triaged step (a collective in data-parallel training).

    Args:
        local: this rank's rows holding at least one kept token.
        rows_per_pass: the most rows in one of this step's micro-batches, on any rank.
        fallback: one row of this rank's, trained with no token where the step keeps none.

    Returns:
        One dict per pass: model inputs of at most ``rows_per_pass`` rows (the step's
        largest micro-batch) with a `TrainingPass` under `PASS_KEY`.
    """
    world = world_size()
    table = local
    if world > 1:
        mine = torch.tensor([rows_per_pass], device=local.values.device)
        rows_per_pass = max(int(n) for n in all_gather_padded(mine))
        table = local.gather()
    kept = table.kept_tokens()
    scale = world / kept if kept else 0.0
    rank = torch.distributed.get_rank() if world > 1 else 0
    passes = []
    for group in plan_passes(table.lengths.tolist(), world, rank, rows_per_pass):
        if group:
            inputs, targets, token_mask = table.rows(group)
        else:  # the rank has fewer rows than passes: a pass that trains on nothing
            source = table if table.num_rows else fallback
            inputs, targets, token_mask = source.rows([0], drop_tokens=True)
        passes.append({**inputs, PASS_KEY: TrainingPass(targets, token_mask, scale)})
    return passes


def no_pass(device: Optional[torch.device]) -> dict[str, Any]:
    """A micro-batch slot that runs no pass: no tokens, so the Trainer's token counters add 0."""
    return {"input_ids": torch.zeros((0, 0), dtype=torch.long, device=device), PASS_KEY: NO_PASS}

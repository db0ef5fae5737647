"""The training passes of a triaged mini-batch: what holds a kept token, regrouped into passes.

Once a mini-batch is scored and triaged, what holds a kept token becomes a unit of a
`UnitTable`: a whole row, or with sample packing a packed segment. The units are regrouped into
training passes of at most ``rows_per_pass`` rows (`plan_passes`), padding trimmed, and kept
segments are packed again into as few rows as they fill, so that the number of forward/backward
passes falls with ``sample_keep_ratio``. Each pass carries in ``loss_scale`` its share of the
mini-batch's loss, the cross-entropy summed over its kept tokens divided by their count.

Under ``triage_scope: step`` (`training_passes` with ``spread=True``) the kept units of every rank are
gathered (token ids and masks only, a few integers per token) and dealt out again so that every
rank runs the same number of passes (DDP and ZeRO all-reduce once per pass, so unequal counts
would hang) and none idles while another has units to train on. Dealing units round-robin in
order of decreasing length also evens out the tokens per rank and puts units of similar length
into the same pass. The loss is normalised by the kept tokens of the whole step on all ranks
(docs/algorithm.md section 6). Under ``triage_scope: micro_batch`` (``spread=False``) each rank trains
its own kept units in one pass, normalised by its own kept tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from qtuning_plugin.distributed import all_gather_padded, world_size
from qtuning_plugin.engine.micro_batch import MicroBatch

# Padding values of the channels past the end of a unit (0 for the others).
_PAD = {"labels": -100, "targets": -100}

#: Key of the training-pass entry in the micro-batches handed back to the Trainer.
PASS_KEY = "qtuning_pass"
#: The entry of a micro-batch slot that runs no pass (the step has fewer passes than micro-batches).
NO_PASS = "no pass"


@dataclass(frozen=True)
class TrainingPass:
    """What one forward/backward of a triaged mini-batch trains on, beside its model inputs.

    Attributes:
        targets: ``[R, T]`` int64 next-token targets (shifted labels), -100 where untrained.
        token_mask: ``[R, T]`` bool, the kept tokens.
        loss_scale: multiplies the pass's summed cross-entropy (nats): world size / kept tokens
            of the whole step on all ranks (so that the mean over ranks of the summed pass losses
            is the step's mean cross-entropy over its kept tokens), or 1 / this rank's kept
            tokens where the passes are not spread over ranks; 0 when nothing is kept.
    """

    targets: Tensor
    token_mask: Tensor
    loss_scale: float


@dataclass(frozen=True)
class UnitTable:
    """The units of a mini-batch (rows, or packed segments) as one integer tensor, so that they travel
    between ranks in one collective.

    Attributes:
        columns: the name of each channel: the micro-batch's integer ``[B, T]`` inputs, then
            ``targets`` and ``token_mask``.
        values: ``[K, L, C]`` int64, unit k's channel c at position t; past a unit's length, the
            channel's padding value (-100 for labels and targets, else 0).
        lengths: ``[K]`` int64, the positions in use of each unit (right padding trimmed).
        segment_ids: None for whole rows; for packed segments, whether the attention mask of a
            packed row numbers its segments 1, 2, ... (Axolotl's packing collator) rather
            than holding ones.
    """

    columns: tuple[str, ...]
    values: Tensor
    lengths: Tensor
    segment_ids: Optional[bool] = None

    @property
    def num_units(self) -> int:
        return self.values.shape[0]

    def kept_tokens(self) -> int:
        return int(self.values[..., self.columns.index("token_mask")].sum())

    def padded_to(self, length: int) -> "UnitTable":
        """The same units with ``length`` positions (>= the current one)."""
        units, current, channels = self.values.shape
        if length == current:
            return self
        tail = _padding(self.columns, self.values.device).expand(units, length - current, channels)
        return replace(self, values=torch.cat([self.values, tail], dim=1))

    def gather(self) -> "UnitTable":
        """Every rank's units, in rank order (a collective: every rank must call it)."""
        values = all_gather_padded(self.values)
        lengths = all_gather_padded(self.lengths)
        length = max(v.shape[1] for v in values)
        parts = [replace(self, values=v, lengths=n).padded_to(length) for v, n in zip(values, lengths)]
        return replace(self, values=torch.cat([p.values for p in parts]), lengths=torch.cat(lengths))

    def rows(self, rows: list[list[int]], drop_tokens: bool = False) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """Training rows, each the units listed (packed one after the other), right-padded to the
        longest: ``(model inputs [R, T], targets [R, T], token_mask [R, T])``.

        ``drop_tokens`` clears the token mask (a pass that must run for the collectives but
        trains on nothing).
        """
        built = []
        for units in rows:
            parts = [self.values[u, : int(self.lengths[u])] for u in units]
            if self.segment_ids is not None and "attention_mask" in self.columns:
                column = self.columns.index("attention_mask")
                parts = [p.clone() for p in parts]
                for number, part in enumerate(parts, start=1):
                    part[:, column] = number if self.segment_ids else 1
            built.append(torch.cat(parts))
        length = max(1, max(r.shape[0] for r in built))
        fill = _padding(self.columns, self.values.device)
        block = torch.stack([torch.cat([r, fill.expand(length - r.shape[0], -1)]) for r in built])
        columns = {name: block[..., c] for c, name in enumerate(self.columns)}
        token_mask = columns.pop("token_mask").bool()
        if drop_tokens:
            token_mask = torch.zeros_like(token_mask)
        targets = columns.pop("targets")
        return columns, targets, token_mask


def _padding(columns: tuple[str, ...], device: torch.device) -> Tensor:
    """``[C]`` int64: each channel's value past the end of a unit."""
    return torch.tensor([_PAD.get(c, 0) for c in columns], dtype=torch.long, device=device)


def _channels(inputs: dict[str, Any], targets: Tensor, token_mask: Tensor) -> tuple[tuple[str, ...], Tensor]:
    """The integer ``[B, T]`` inputs (token ids, masks, position and type ids, labels), and every
    channel stacked: ``[B, T, C]`` int64."""
    shape = targets.shape
    columns = [
        key for key, value in inputs.items()
        if torch.is_tensor(value) and value.shape == shape and not value.is_floating_point()
    ]
    values = torch.stack([inputs[key].long() for key in columns] + [targets, token_mask.long()], dim=-1)
    return (*columns, "targets", "token_mask"), values


def used_length(inputs: dict[str, Any], batch: int, length: int) -> Tensor:
    """``[B]`` int64: each row's positions up to its last attended one (all of them without a mask)."""
    mask = inputs.get("attention_mask")
    if mask is None or mask.dim() != 2:
        return torch.full((batch,), length, dtype=torch.long)
    positions = torch.arange(1, length + 1, device=mask.device)
    return (mask.ne(0) * positions).amax(dim=1).clamp(min=1).cpu()


def unit_table(batch: MicroBatch, token_mask: Tensor, units: Optional[Tensor] = None) -> UnitTable:
    """Units of one micro-batch: its rows, or its packed segments (each with its own
    ``position_ids`` from 0; the attention mask is renumbered when the units are packed into rows
    again, `UnitTable.rows`).

    Args:
        batch: the micro-batch (its integer ``[B, T]`` inputs are carried).
        token_mask: ``[B, T]`` bool, the kept tokens.
        units: ``[k]`` int64, the rows (segments) to take; default: those holding a kept token.
    """
    columns, values = _channels(batch.inputs, batch.targets, token_mask)
    if units is None:
        units = batch.per_sample(token_mask, False).any(dim=1).nonzero().squeeze(1)
    if batch.segments is None:
        lengths = used_length(batch.inputs, *batch.targets.shape).to(units.device)[units]
        width = int(lengths.max()) if units.numel() else 0
        return UnitTable(columns, values[units, :width], lengths)
    flat, sample = values.flatten(0, 1), batch.segments.sample.flatten()
    parts = [flat[sample == s] for s in units.tolist()]
    lengths = torch.tensor([p.shape[0] for p in parts], dtype=torch.long, device=values.device)
    width = int(lengths.max()) if parts else 0
    padded = _padding(columns, values.device).expand(len(parts), width, -1).clone()
    for k, part in enumerate(parts):
        padded[k, : part.shape[0]] = part
    mask = batch.inputs.get("attention_mask")
    numbered = mask is not None and bool((mask > 1).any())
    return UnitTable(columns, padded, lengths, segment_ids=numbered)


def concat(tables: list[UnitTable]) -> UnitTable:
    """The units of several tables (same columns and kind) in order."""
    length = max(t.values.shape[1] for t in tables)
    padded = [t.padded_to(length) for t in tables]
    return replace(tables[0], values=torch.cat([t.values for t in padded]), lengths=torch.cat([t.lengths for t in padded]))


def _first_fit(units: list[int], lengths: list[int], capacity: int) -> list[list[int]]:
    """Units (in order of decreasing length) packed into rows of ``capacity`` positions, first fit."""
    rows: list[list[int]] = []
    free: list[int] = []
    for unit in units:
        for r, room in enumerate(free):
            if lengths[unit] <= room:
                rows[r].append(unit)
                free[r] -= lengths[unit]
                break
        else:
            rows.append([unit])
            free.append(capacity - lengths[unit])
    return rows


def plan_passes(
    lengths: list[int],
    world: int,
    rank: int,
    rows_per_pass: int,
    capacity: Optional[int] = None,
    max_passes: Optional[int] = None,
) -> list[list[list[int]]]:
    """Deal K kept units out to ``world`` ranks and group this rank's into passes.

    Units are dealt round-robin in order of decreasing length (ties: lower index first). Each
    unit is a row of its own, or with ``capacity`` (packed segments) the units are packed into
    rows of that many positions, first fit. Every rank gets the same number of passes,
    ``P = max(1, ceil(most rows on one rank / rows_per_pass))``, at most ``max_passes``, its
    rows split into P contiguous groups whose sizes differ by at most one (so none exceeds
    ``rows_per_pass`` unless ``max_passes`` capped P: first fit can need more rows than the
    packing it repacks). A group is empty only where this rank has fewer rows than passes.

    Returns:
        P passes for ``rank``, each a list of rows, each a list of unit indices (into ``lengths``).
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])

    def rows_of(r: int) -> list[list[int]]:
        share = order[r::world]
        return [[u] for u in share] if capacity is None else _first_fit(share, lengths, capacity)

    passes = max(1, max(math.ceil(len(rows_of(r)) / rows_per_pass) for r in range(world)))
    if max_passes is not None:
        passes = min(passes, max_passes)
    rows = rows_of(rank)
    size, extra = divmod(len(rows), passes)
    groups, start = [], 0
    for p in range(passes):
        end = start + size + (1 if p < extra else 0)
        groups.append(rows[start:end])
        start = end
    return groups


def training_passes(batches: Sequence[MicroBatch], token_masks: Sequence[Tensor], *, spread: bool) -> list[dict[str, Any]]:
    """The training passes of a triaged mini-batch (a collective when ``spread`` in data-parallel training).

    Args:
        batches: the mini-batch's micro-batches on this rank.
        token_masks: each one's ``[B, T]`` bool kept tokens.
        spread: deal the kept units of every rank out to the ranks and normalise by the kept
            tokens of all ranks (``triage_scope: step``); else this rank's units in one pass,
            normalised by its own kept tokens (``micro_batch``).

    Returns:
        One dict per pass, at most ``len(batches)``: model inputs of at most as many rows as
        the largest micro-batch (on any rank) holds, with a `TrainingPass` under `PASS_KEY`.
    """
    table = concat([unit_table(b, m) for b, m in zip(batches, token_masks)])
    rows_per_pass = max(b.targets.shape[0] for b in batches)
    # Packed segments are packed into rows as wide as the widest row of the mini-batch.
    row_capacity = max(b.targets.shape[1] for b in batches)
    world = world_size() if spread else 1
    if world > 1:
        mine = torch.tensor([rows_per_pass, row_capacity], device=table.values.device)
        shapes = torch.stack(all_gather_padded(mine))
        rows_per_pass, row_capacity = (int(n) for n in shapes.amax(dim=0))
        table = table.gather()
    kept = table.kept_tokens()
    scale = world / kept if kept else 0.0
    rank = torch.distributed.get_rank() if world > 1 else 0
    capacity = None if table.segment_ids is None else row_capacity
    passes = []
    for rows in plan_passes(table.lengths.tolist(), world, rank, rows_per_pass, capacity, len(batches)):
        if rows:
            inputs, targets, token_mask = table.rows(rows)
        else:  # the rank has fewer rows than passes: a pass that trains on nothing
            first = batches[0].targets.new_zeros(1)
            source = table if table.num_units else unit_table(batches[0], token_masks[0], units=first)
            inputs, targets, token_mask = source.rows([[0]], drop_tokens=True)
        passes.append({**inputs, PASS_KEY: TrainingPass(targets, token_mask, scale)})
    return passes


def no_pass(device: Optional[torch.device]) -> dict[str, Any]:
    """A micro-batch slot that runs no pass: no tokens, so the Trainer's token counters add 0."""
    return {"input_ids": torch.zeros((0, 0), dtype=torch.long, device=device), PASS_KEY: NO_PASS}

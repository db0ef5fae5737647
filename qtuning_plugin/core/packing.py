"""Packed rows: one row of a batch holding several samples (sample packing).

Triage treats each packed sample (a segment, opened where ``position_ids`` is
0) as a sample of its own. `Segments` maps ``[B, T]`` row tensors to
``[S, L]`` sample tensors (S segments, L the longest) and back, so that the
same `select` serves packed and unpacked batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


def is_packed(position_ids: Tensor, attention_mask: Optional[Tensor] = None) -> bool:
    """Whether some row of the batch holds more than one sample.

    A row holds several samples where its ``position_ids`` restart: a 0 after
    column 0, at a token that follows another token of the row. This is how
    every packing collator marks its samples (Axolotl's ``sample_packing``,
    TRL's ``padding_free`` and ``packing``, transformers'
    ``DataCollatorWithFlattening``), whatever the trainer calls the setting.
    With an ``attention_mask``, positions where it is 0 are padding, not
    tokens, so left-padded rows (position 0 after the padding) are not packed.

    Args:
        position_ids: ``[B, T]`` int64.
        attention_mask: optional ``[B, T]``, 0 at padding (any non-zero value,
            such as Axolotl's per-sample ids, is a token).
    """
    restart = position_ids[:, 1:] == 0
    if attention_mask is not None:
        tokens = attention_mask != 0
        restart &= tokens[:, 1:] & tokens[:, :-1]
    return bool(restart.any())


@dataclass(frozen=True)
class Segments:
    """Where each position of a packed ``[B, T]`` batch lies in ``[S, L]``.

    Padding (``attention_mask`` 0, where a mask is given) belongs to no segment: a padding
    tail is not a sample, and a padded position is left out of the unpacked values.

    Attributes:
        sample: ``[B, T]`` int64, the segment (sample) of each position; -1 at padding.
        slot: ``[B, T]`` int64, the position's offset inside its segment (0 at padding).
        num_samples: S.
        max_len: L.
    """

    sample: Tensor
    slot: Tensor
    num_samples: int
    max_len: int

    @classmethod
    def from_position_ids(cls, position_ids: Tensor, attention_mask: Optional[Tensor] = None) -> "Segments":
        """Segments of ``position_ids [B, T]``: a new one starts at every token whose position id is 0,
        and at the first token of a row or after padding."""
        tokens = torch.ones_like(position_ids, dtype=torch.bool) if attention_mask is None else attention_mask != 0
        after_gap = torch.ones_like(tokens)
        after_gap[:, 1:] = ~tokens[:, :-1]
        starts = tokens & ((position_ids == 0) | after_gap)
        count = starts.long().cumsum(dim=1)
        per_row = count[:, -1]
        row_offset = torch.cumsum(per_row, dim=0) - per_row
        sample = torch.where(tokens, count - 1 + row_offset.unsqueeze(1), -1)
        columns = torch.arange(position_ids.shape[1], device=position_ids.device).expand_as(position_ids)
        start_column = torch.where(starts, columns, torch.zeros_like(columns)).cummax(dim=1).values
        slot = torch.where(tokens, columns - start_column, 0)
        return cls(sample, slot, int(per_row.sum()), int(slot.max()) + 1 if bool(tokens.any()) else 0)

    def unpack(self, values: Tensor, fill: float | bool = 0) -> Tensor:
        """``[B, T]`` row values to ``[S, L]`` sample values, ``fill`` past each sample's end."""
        out = torch.full((self.num_samples, self.max_len), fill, dtype=values.dtype, device=values.device)
        tokens = self.sample >= 0
        out[self.sample[tokens], self.slot[tokens]] = values[tokens]
        return out

    def repack(self, values: Tensor, fill: float | bool = 0) -> Tensor:
        """``[S, L]`` sample values back to ``[B, T]`` rows, ``fill`` at padding."""
        out = torch.full(self.sample.shape, fill, dtype=values.dtype, device=values.device)
        tokens = self.sample >= 0
        out[tokens] = values[self.sample[tokens], self.slot[tokens]]
        return out

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

    Attributes:
        sample: ``[B, T]`` int64, the segment (sample) of each position.
        slot: ``[B, T]`` int64, the position's offset inside its segment.
        num_samples: S.
        max_len: L.
    """

    sample: Tensor
    slot: Tensor
    num_samples: int
    max_len: int

    @classmethod
    def from_position_ids(cls, position_ids: Tensor) -> "Segments":
        """Segments of ``position_ids [B, T]``: a new one starts at every 0 (and at column 0)."""
        starts = position_ids == 0
        starts[:, 0] = True
        local = starts.long().cumsum(dim=1) - 1
        per_row = local[:, -1] + 1
        row_offset = torch.cumsum(per_row, dim=0) - per_row
        sample = local + row_offset.unsqueeze(1)
        columns = torch.arange(position_ids.shape[1], device=position_ids.device).expand_as(position_ids)
        start_column = torch.where(starts, columns, torch.zeros_like(columns)).cummax(dim=1).values
        slot = columns - start_column
        return cls(sample, slot, int(per_row.sum()), int(slot.max()) + 1)

    def unpack(self, values: Tensor, fill: float | bool = 0) -> Tensor:
        """``[B, T]`` row values to ``[S, L]`` sample values, ``fill`` past each sample's end."""
        out = torch.full((self.num_samples, self.max_len), fill, dtype=values.dtype, device=values.device)
        out[self.sample, self.slot] = values
        return out

    def repack(self, values: Tensor) -> Tensor:
        """``[S, L]`` sample values back to ``[B, T]`` rows."""
        return values[self.sample, self.slot]

"""Packed rows: one row of a batch holding several samples (sample packing).

Triage treats each packed sample (a segment, opened where ``position_ids`` is
0) as a sample of its own. `Segments` maps ``[B, T]`` row tensors to
``[S, L]`` sample tensors (S segments, L the longest) and back, so that the
same `select` serves packed and unpacked batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


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

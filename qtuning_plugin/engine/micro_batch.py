"""One training micro-batch as the engine sees it: its inputs, next-token targets and, for packed
rows, where each sample lies.

A *sample* is what triage scores and keeps or drops: a row, or with sample packing a packed
segment of a row (`qtuning_plugin.core.Segments`). `MicroBatch.per_sample` and
`MicroBatch.per_row` move ``[B, T]`` row tensors to ``[S, L]`` sample tensors and back, so
that the same core `select` serves packed and unpacked batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import Tensor

from qtuning_plugin.core import Segments, is_packed
from qtuning_plugin.modeling import shifted_targets


@dataclass(frozen=True)
class MicroBatch:
    """A prepared micro-batch.

    Attributes:
        inputs: the model inputs as the host prepared them, ``labels`` included.
        targets: ``[B, T]`` int64 next-token targets (shifted labels), -100 where untrained;
            in packed rows the first token of each sample is untrained too.
        segments: the packed samples, or None when each row is one sample.
    """

    inputs: dict[str, Any]
    targets: Tensor
    segments: Optional[Segments]

    @classmethod
    def prepare(cls, inputs: dict[str, Any]) -> "MicroBatch":
        """Targets and packed segments of ``inputs`` (``labels [B, T]`` with -100 where untrained).

        Rows are packed where their ``position_ids`` restart at 0 between tokens
        (`qtuning_plugin.core.is_packed`), whatever the host calls its packing setting.
        """
        position_ids = inputs.get("position_ids")
        attention_mask = inputs.get("attention_mask")
        packed = position_ids is not None and is_packed(position_ids, attention_mask)
        segments = Segments.from_position_ids(position_ids, attention_mask) if packed else None
        targets = shifted_targets(inputs["labels"], position_ids if packed else None)
        return cls(inputs, targets, segments)

    @property
    def packed(self) -> bool:
        return self.segments is not None

    @property
    def mask(self) -> Tensor:
        """``[B, T]`` bool, the trainable positions."""
        return self.targets != -100

    @property
    def num_samples(self) -> int:
        return self.targets.shape[0] if self.segments is None else self.segments.num_samples

    def per_sample(self, values: Tensor, fill: Union[float, bool] = 0) -> Tensor:
        """``[B, T]`` row values as ``[S, L]`` sample values (the same tensor without packing)."""
        return values if self.segments is None else self.segments.unpack(values, fill)

    def per_row(self, values: Tensor, fill: Union[float, bool] = 0) -> Tensor:
        """``[S, L]`` sample values back as ``[B, T]`` row values."""
        return values if self.segments is None else self.segments.repack(values, fill)

    def sample_lengths(self) -> Tensor:
        """``[S]`` int64: each sample's tokens (padding left out)."""
        attention_mask = self.inputs.get("attention_mask")
        tokens = torch.ones_like(self.targets, dtype=torch.bool) if attention_mask is None else attention_mask != 0
        return self.per_sample(tokens, False).sum(dim=1)

    def sample_input_ids(self) -> list[Tensor]:
        """Each sample's ``input_ids`` (1-D int64, padding left out), in sample order."""
        input_ids = self.inputs["input_ids"]
        if self.segments is None:
            attention_mask = self.inputs.get("attention_mask")
            if attention_mask is None:
                return list(input_ids)
            return [row[mask != 0] for row, mask in zip(input_ids, attention_mask)]
        sample = self.segments.sample
        return [input_ids[sample == s] for s in range(self.segments.num_samples)]

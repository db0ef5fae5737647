"""Data-parallel collectives of Q-Tuning: every rank sees the global mini-batch (docs/algorithm.md section 4)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from qtuning_plugin.core import SampleGather


def world_size() -> int:
    """The number of ranks of the default process group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_gather_padded(local: Tensor, fill: float = 0) -> list[Tensor]:
    """Every rank's ``local`` tensor, whatever its shape (same dtype and number of dims on every rank).

    Each is padded with ``fill`` to the largest extent of every dim for the collective,
    and returned cut back to its own shape, in rank order.
    """
    world = dist.get_world_size()
    shape = torch.tensor(local.shape, dtype=torch.long, device=local.device)
    shapes = [torch.zeros_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    shapes = [tuple(int(n) for n in s) for s in shapes]
    largest = tuple(max(extent) for extent in zip(*shapes)) if local.dim() else ()
    padded = local.new_full(largest, fill)
    padded[tuple(slice(0, n) for n in local.shape)] = local
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return [g[tuple(slice(0, n) for n in s)] for g, s in zip(gathered, shapes)]


def gather_samples(local: Tensor) -> tuple[Tensor, int]:
    """All-gather per-sample rows of unequal counts across ranks.

    Args:
        local: ``[B_rank, k]`` float64 rows of this rank (k = 3: ppl, ent, valid).

    Returns:
        ``([sum_r B_r, k] rows in rank order, offset of this rank's first row)``.
    """
    parts = all_gather_padded(local)
    rank = dist.get_rank()
    return torch.cat(parts), sum(part.shape[0] for part in parts[:rank])


def default_sample_gather() -> Optional[SampleGather]:
    """`gather_samples` when a process group of more than one rank is running, else None."""
    return gather_samples if world_size() > 1 else None

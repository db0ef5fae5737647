"""Data-parallel triage: every rank sees the global mini-batch's (PPL, Ent) pairs (SPEC section 4)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from qtuning_plugin.core import SampleGather


def gather_samples(local: Tensor) -> tuple[Tensor, int]:
    """All-gather per-sample rows of unequal counts across ranks.

    Args:
        local: ``[B_rank, k]`` float64 rows of this rank (k = 3: ppl, ent, valid).

    Returns:
        ``([sum_r B_r, k] rows in rank order, offset of this rank's first row)``.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    count = torch.tensor([local.shape[0]], dtype=torch.long, device=local.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    padded = local.new_zeros((max(counts), local.shape[1]))
    padded[: local.shape[0]] = local
    gathered = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    rows = torch.cat([g[:c] for g, c in zip(gathered, counts)])
    return rows, sum(counts[:rank])


def default_sample_gather() -> Optional[SampleGather]:
    """`gather_samples` when a process group of more than one rank is running, else None."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return gather_samples
    return None

"""Which fused linear cross-entropy computes the statistics and the loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from qtuning_plugin.ops.torch_chunked import linear_cross_entropy, token_stats


@dataclass(frozen=True)
class Backend:
    """A pair of fused ops with the signatures of `torch_chunked`.

    ``linear_cross_entropy`` is only ever called with ``reduction="sum"``.
    """

    name: str
    token_stats: Callable
    linear_cross_entropy: Callable


TORCH = Backend("torch", token_stats, linear_cross_entropy)


def resolve_backend(name: str, device: torch.device) -> Backend:
    """The backend for the `qtuning.backend` setting on ``device``."""
    if name not in ("auto", "torch"):
        raise ValueError(f"qtuning.backend must be one of auto, torch; got {name!r}")
    return TORCH

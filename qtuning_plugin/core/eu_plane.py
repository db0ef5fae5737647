"""The Error-Uncertainty plane: one (PPL, Ent) point per sample (docs/algorithm.md section 2)."""

from __future__ import annotations

import torch
from torch import Tensor


def sample_stats(nll: Tensor, entropy: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample perplexity and mean predictive entropy over trainable positions.

    Args:
        nll: ``[B, T]`` float, per-token negative log-likelihood in nats.
        entropy: ``[B, T]`` float, per-token predictive entropy in nats.
        mask: ``[B, T]`` bool, True at trainable (response) positions.

    Returns:
        ``(ppl, ent)``, each ``[B]`` float64: ``ppl = exp(mean nll)`` (eq. 4) and
        ``ent = mean entropy`` (eq. 5) over the sample's trainable positions.
        A sample with no trainable position gets NaN in both: it takes no part
        in triage (see `triage_samples`'s ``valid``).
    """
    if nll.shape != entropy.shape or nll.shape != mask.shape or nll.dim() != 2:
        raise ValueError(
            f"nll, entropy and mask must share one [B, T] shape; got {tuple(nll.shape)}, "
            f"{tuple(entropy.shape)}, {tuple(mask.shape)}"
        )
    mask = mask.bool()
    count = mask.sum(dim=1).to(torch.float64)
    zero = torch.zeros((), dtype=torch.float64, device=nll.device)
    nll_sum = torch.where(mask, nll.to(torch.float64), zero).sum(dim=1)
    ent_sum = torch.where(mask, entropy.to(torch.float64), zero).sum(dim=1)
    # 0 / 0 gives the documented NaN for rows without trainable positions.
    return torch.exp(nll_sum / count), ent_sum / count

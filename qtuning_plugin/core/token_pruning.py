"""Context-aware token pruning inside Q2 samples (docs/algorithm.md section 5, eq. 7)."""

from __future__ import annotations

import torch
from torch import Tensor


def token_scores(nll: Tensor, mask: Tensor, *, context_weight: float = 0.5) -> Tensor:
    """Eq. 7: ``s_i = (1 - lam) * ppl_i + lam * (ppl_{i-1} + ppl_{i+1})``.

    Args:
        nll: ``[B, T]`` per-token negative log-likelihood in nats.
        mask: ``[B, T]`` bool, trainable positions.
        context_weight: lam in [0, 1].

    Returns:
        ``[B, T]`` float64 scores (perplexity units). A neighbour outside the
        trainable span counts 0; non-trainable positions score +inf, so that
        they sort after every trainable one.
    """
    if not 0.0 <= context_weight <= 1.0:
        raise ValueError(f"context_weight must be in [0, 1]; got {context_weight}")
    mask = mask.bool()
    ppl = torch.where(mask, nll.to(torch.float64).exp(), torch.zeros((), dtype=torch.float64, device=nll.device))
    neighbours = torch.zeros_like(ppl)
    neighbours[:, 1:] += ppl[:, :-1]
    neighbours[:, :-1] += ppl[:, 1:]
    scores = (1.0 - context_weight) * ppl + context_weight * neighbours
    return scores.masked_fill(~mask, float("inf"))


def prune_tokens(
    nll: Tensor,
    mask: Tensor,
    q2: Tensor,
    token_keep_ratio: float,
    *,
    context_weight: float = 0.5,
    prune_highest: bool = True,
) -> Tensor:
    """Keep the lowest-scoring ``max(1, floor(r_token * L))`` tokens of each Q2 sample.

    Args:
        nll: ``[B, T]`` per-token negative log-likelihood in nats.
        mask: ``[B, T]`` bool, trainable positions; L is a row's count.
        q2: ``[B]`` bool, the rows to prune.
        token_keep_ratio: r_token in (0, 1].
        context_weight: lam of eq. 7, in [0, 1].
        prune_highest: False reverses the ranking and keeps the highest-scoring
            tokens instead (the paper's ablation, which does worse).

    Returns:
        ``[B, T]`` bool keep mask. Q2 rows keep their lowest-scoring tokens
        (ties: the earlier position); every other row is ``mask`` unchanged.
    """
    if not 0.0 < token_keep_ratio <= 1.0:
        raise ValueError(f"token_keep_ratio must be in (0, 1]; got {token_keep_ratio}")
    mask = mask.bool()
    scores = token_scores(nll, mask, context_weight=context_weight)
    if not prune_highest:
        scores = torch.where(mask, -scores, scores)
    # Stable ascending sort: among equal scores the earlier position ranks first.
    order = torch.sort(scores, dim=1, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    length = mask.sum(dim=1, dtype=torch.float64)
    budget = torch.floor(token_keep_ratio * length).clamp(min=1)
    pruned = mask & (rank < budget.unsqueeze(1))
    return torch.where(q2.bool().unsqueeze(1), pruned, mask)

"""Sample triage on the EU plane: quantile bisection plus fill-up (docs/algorithm.md section 4), with
thresholds from a window of earlier steps and a held budget where asked (section 4a)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

# The paper searches alpha in [0, 0.5]; the released code used 0.49 (docs/algorithm.md section 4).
ALPHA_UPPER = 0.49
# Below this spread a statistic counts as constant in the fill-up normalisation.
MIN_SPREAD = 1e-12
#: The quadrant names; `Triage.quadrant` holds indices into this tuple.
QUADRANTS = ("Q1", "Q2", "Q3", "Q4", "middle")
Q1, Q2, Q3, Q4, MIDDLE = range(len(QUADRANTS))
#: `Triage.quadrant` of a sample without trainable tokens (it takes no part in the triage).
NO_TARGET = -1


@dataclass(frozen=True)
class Triage:
    """The outcome of `triage_samples` for one mini-batch of B samples (the samples triaged together).

    Attributes:
        q2: ``[B]`` bool, valuable misconceptions (high PPL, low Ent): kept, tokens pruned.
        q4: ``[B]`` bool, calibration data (low PPL, high Ent): kept whole.
        keep: ``[B]`` bool, ``q2 | q4``.
        filled: ``[B]`` bool, the kept samples that the fill-up step added.
        trimmed: ``[B]`` bool, the samples the thresholds put in Q2 or Q4 that were dropped to
            hold the budget (``hold_budget``); filed in the middle band.
        quadrant: ``[B]`` int64, each sample's index into `QUADRANTS`, or `NO_TARGET`. Kept
            samples are Q2 or Q4 (``q2``/``q4``, fill-up included); a dropped one is Q1
            (PPL > ppl_hi and Ent > ent_hi), Q3 (PPL <= ppl_lo and Ent <= ent_lo) or the
            middle band, by the last bisection iterate.
        alpha: the last bisection iterate (NaN when no sample is valid).
        ppl_hi, ppl_lo, ent_lo, ent_hi: the last iterate's quantile thresholds
            (PPL in perplexity units, Ent in nats).
        iterations: bisection iterations run.
        target: K, the number of samples the triage aims to keep.
        pooled: the samples the thresholds and the bisection rest on: the valid ones of this
            mini-batch plus the earlier steps' of the window.
    """

    q2: Tensor
    q4: Tensor
    keep: Tensor
    filled: Tensor
    trimmed: Tensor
    quadrant: Tensor
    alpha: float
    ppl_hi: float
    ppl_lo: float
    ent_lo: float
    ent_hi: float
    iterations: int
    target: int
    pooled: int


def _check_args(
    ppl: Tensor, ent: Tensor, sample_keep_ratio: float, max_iters: int, tol: float, earlier: Optional[Tensor]
) -> None:
    if ppl.dim() != 1 or ppl.shape != ent.shape:
        raise ValueError(f"ppl and ent must both be [B]; got {tuple(ppl.shape)} and {tuple(ent.shape)}")
    if earlier is not None and (earlier.dim() != 2 or earlier.shape[1] != 2):
        raise ValueError(f"earlier must be [M, 2] (PPL, Ent); got {tuple(earlier.shape)}")
    if not 0.0 < sample_keep_ratio <= 1.0:
        raise ValueError(f"sample_keep_ratio must be in (0, 1]; got {sample_keep_ratio}")
    if max_iters < 1:
        raise ValueError(f"max_bisect_iters must be >= 1; got {max_iters}")
    if not tol > 0.0:
        raise ValueError(f"bisect_tolerance must be > 0; got {tol}")


def _minmax(x: Tensor) -> Tensor:
    spread = x.max() - x.min()
    if spread < MIN_SPREAD:
        return torch.zeros_like(x)
    return (x - x.min()) / spread


def triage_samples(
    ppl: Tensor,
    ent: Tensor,
    sample_keep_ratio: float,
    *,
    max_iters: int = 10,
    tol: float = 0.01,
    valid: Optional[Tensor] = None,
    earlier: Optional[Tensor] = None,
    hold_budget: bool = False,
) -> Triage:
    """Split a mini-batch into Q2 / Q4 (kept) and the rest (dropped), Algorithm 1.

    Args:
        ppl: ``[B]`` per-sample perplexity (`sample_stats`).
        ent: ``[B]`` per-sample mean entropy in nats.
        sample_keep_ratio: r_sample in (0, 1].
        max_iters: bisection iterations at most (>= 1).
        tol: stop once ``|kept fraction - r_sample| < tol`` (> 0).
        valid: ``[B]`` bool, the samples that take part (those with trainable
            tokens); default all. Invalid samples are never kept and are not
            counted in |B|. A valid sample must have finite statistics.
        earlier: ``[M, 2]`` (PPL, Ent) of samples triaged before (the earlier steps of a triage
            window, docs/algorithm.md section 4a), finite: pooled with the valid samples for the
            quantile thresholds, the bisection's kept fraction and the fill-up's normalisation;
            never kept themselves, and not counted in |B|.
        hold_budget: keep exactly K: where more than K samples qualify, those with the lowest
            fill-up score are dropped (`Triage.trimmed`). Without it (the paper's rule) every
            qualifying sample is kept.

    Returns:
        A `Triage` whose masks live on ``ppl``'s device. At least
        ``K = max(1, round(r_sample * |B|))`` samples are kept when |B| >= 1; exactly K with
        ``hold_budget``.
    """
    _check_args(ppl, ent, sample_keep_ratio, max_iters, tol, earlier)
    device = ppl.device
    if valid is None:
        valid = torch.ones_like(ppl, dtype=torch.bool)
    # A handful of floats: the loop runs on the CPU, in float64, with one device sync.
    valid_cpu = valid.detach().to("cpu", torch.bool)
    index = valid_cpu.nonzero().squeeze(1)
    ppl_v = ppl.detach().to("cpu", torch.float64)[index]
    ent_v = ent.detach().to("cpu", torch.float64)[index]
    if not (torch.isfinite(ppl_v).all() and torch.isfinite(ent_v).all()):
        raise ValueError("triage_samples: a valid sample has a non-finite PPL or Ent")

    n = index.numel()
    batch = ppl.shape[0]

    def scatter(local: Tensor, fill: Union[bool, int] = False) -> Tensor:
        """``[n]`` values of the valid samples -> ``[B]`` on ``device``, ``fill`` elsewhere."""
        full = torch.full((batch,), fill, dtype=local.dtype)
        full[index] = local
        return full.to(device)

    if n == 0:
        nan, empty = math.nan, scatter(torch.zeros(0, dtype=torch.bool))
        return Triage(empty, empty, empty, empty, empty, scatter(torch.zeros(0, dtype=torch.long), NO_TARGET),
                      nan, nan, nan, nan, nan, 0, 0, 0)

    # The pool: this mini-batch's valid samples first, then the window's earlier ones.
    pool_ppl, pool_ent = ppl_v, ent_v
    if earlier is not None and earlier.numel():
        earlier = earlier.detach().to("cpu", torch.float64)
        if not torch.isfinite(earlier).all():
            raise ValueError("triage_samples: an earlier sample has a non-finite PPL or Ent")
        pool_ppl, pool_ent = torch.cat([ppl_v, earlier[:, 0]]), torch.cat([ent_v, earlier[:, 1]])
    pooled = pool_ppl.numel()

    target = max(1, round(sample_keep_ratio * n))
    lo, hi = 0.0, ALPHA_UPPER
    for iteration in range(1, max_iters + 1):
        alpha = (lo + hi) / 2
        ppl_hi = torch.quantile(pool_ppl, 1 - alpha).item()
        ppl_lo = torch.quantile(pool_ppl, alpha).item()
        ent_lo = torch.quantile(pool_ent, alpha).item()
        ent_hi = torch.quantile(pool_ent, 1 - alpha).item()
        pool_q2 = (pool_ppl > ppl_hi) & (pool_ent <= ent_lo)
        pool_q4 = (pool_ppl <= ppl_lo) & (pool_ent > ent_hi)
        kept_fraction = (pool_q2.sum() + pool_q4.sum()).item() / pooled
        if abs(kept_fraction - sample_keep_ratio) < tol:
            break
        if kept_fraction < sample_keep_ratio:
            lo = alpha
        else:
            hi = alpha
    q2, q4 = pool_q2[:n], pool_q4[:n]

    filled = torch.zeros(n, dtype=torch.bool)
    trimmed = torch.zeros(n, dtype=torch.bool)
    missing = target - int((q2 | q4).sum())
    if missing > 0 or (hold_budget and missing < 0):
        p, e = _minmax(pool_ppl)[:n], _minmax(pool_ent)[:n]
        support = torch.maximum(p - e, e - p)
        if missing > 0:
            support[q2 | q4] = -math.inf
            # Stable descending sort: among equal support the lower batch index comes first.
            order = torch.sort(support, descending=True, stable=True).indices
            filled[order[:missing]] = True
            q2 = q2 | (filled & (p - e >= e - p))
            q4 = q4 | (filled & (p - e < e - p))
        else:
            support[~(q2 | q4)] = -math.inf
            # The K qualifying samples of highest support stay (ties: the lower batch index).
            order = torch.sort(support, descending=True, stable=True).indices
            trimmed[order[target : target - missing]] = True
            q2, q4 = q2 & ~trimmed, q4 & ~trimmed

    quadrant = torch.full((n,), MIDDLE, dtype=torch.long)
    quadrant[(ppl_v > ppl_hi) & (ent_v > ent_hi)] = Q1
    quadrant[(ppl_v <= ppl_lo) & (ent_v <= ent_lo)] = Q3
    quadrant[q2] = Q2
    quadrant[q4] = Q4

    return Triage(
        q2=scatter(q2),
        q4=scatter(q4),
        keep=scatter(q2 | q4),
        filled=scatter(filled),
        trimmed=scatter(trimmed),
        quadrant=scatter(quadrant, NO_TARGET),
        alpha=alpha,
        ppl_hi=ppl_hi,
        ppl_lo=ppl_lo,
        ent_lo=ent_lo,
        ent_hi=ent_hi,
        iterations=iteration,
        target=target,
        pooled=pooled,
    )

"""Sample triage on the EU plane: quantile bisection plus fill-up (docs/algorithm.md section 4)."""

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
        quadrant: ``[B]`` int64, each sample's index into `QUADRANTS`, or `NO_TARGET`. Kept
            samples are Q2 or Q4 (``q2``/``q4``, fill-up included); a dropped one is Q1
            (PPL > ppl_hi and Ent > ent_hi), Q3 (PPL <= ppl_lo and Ent <= ent_lo) or the
            middle band, by the last bisection iterate.
        alpha: the last bisection iterate (NaN when no sample is valid).
        ppl_hi, ppl_lo, ent_lo, ent_hi: the last iterate's quantile thresholds
            (PPL in perplexity units, Ent in nats).
        iterations: bisection iterations run.
        target: K, the number of samples the triage aims to keep.
    """

    q2: Tensor
    q4: Tensor
    keep: Tensor
    filled: Tensor
    quadrant: Tensor
    alpha: float
    ppl_hi: float
    ppl_lo: float
    ent_lo: float
    ent_hi: float
    iterations: int
    target: int


def _check_args(ppl: Tensor, ent: Tensor, sample_keep_ratio: float, max_iters: int, tol: float) -> None:
    if ppl.dim() != 1 or ppl.shape != ent.shape:
        raise ValueError(f"ppl and ent must both be [B]; got {tuple(ppl.shape)} and {tuple(ent.shape)}")
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

    Returns:
        A `Triage` whose masks live on ``ppl``'s device. At least
        ``K = max(1, round(r_sample * |B|))`` samples are kept when |B| >= 1.
    """
    _check_args(ppl, ent, sample_keep_ratio, max_iters, tol)
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
        return Triage(empty, empty, empty, empty, scatter(torch.zeros(0, dtype=torch.long), NO_TARGET),
                      nan, nan, nan, nan, nan, 0, 0)

    target = max(1, round(sample_keep_ratio * n))
    lo, hi = 0.0, ALPHA_UPPER
    for iteration in range(1, max_iters + 1):
        alpha = (lo + hi) / 2
        ppl_hi = torch.quantile(ppl_v, 1 - alpha).item()
        ppl_lo = torch.quantile(ppl_v, alpha).item()
        ent_lo = torch.quantile(ent_v, alpha).item()
        ent_hi = torch.quantile(ent_v, 1 - alpha).item()
        q2 = (ppl_v > ppl_hi) & (ent_v <= ent_lo)
        q4 = (ppl_v <= ppl_lo) & (ent_v > ent_hi)
        kept_fraction = (q2.sum() + q4.sum()).item() / n
        if abs(kept_fraction - sample_keep_ratio) < tol:
            break
        if kept_fraction < sample_keep_ratio:
            lo = alpha
        else:
            hi = alpha

    filled = torch.zeros(n, dtype=torch.bool)
    missing = target - int((q2 | q4).sum())
    if missing > 0:
        p, e = _minmax(ppl_v), _minmax(ent_v)
        support = torch.maximum(p - e, e - p)
        support[q2 | q4] = -math.inf
        # Stable descending sort: among equal support the lower batch index comes first.
        order = torch.sort(support, descending=True, stable=True).indices
        filled[order[:missing]] = True
        q2 = q2 | (filled & (p - e >= e - p))
        q4 = q4 | (filled & (p - e < e - p))

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
        quadrant=scatter(quadrant, NO_TARGET),
        alpha=alpha,
        ppl_hi=ppl_hi,
        ppl_lo=ppl_lo,
        ent_lo=ent_lo,
        ent_hi=ent_hi,
        iterations=iteration,
        target=target,
    )

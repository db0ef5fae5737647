"""One call per mini-batch (the samples triaged together): EU plane -> triage -> Q2 token pruning
-> masks and statistics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from qtuning_plugin.config import QTuningConfig
from qtuning_plugin.core.eu_plane import sample_stats
from qtuning_plugin.core.token_pruning import prune_tokens
from qtuning_plugin.core.triage import QUADRANTS, Triage, triage_samples

# Maps this rank's ``[B, 3]`` float64 rows (ppl, ent, valid) to the rows of the
# global mini-batch and the offset of this rank's first row in them.
SampleGather = Callable[[Tensor], tuple[Tensor, int]]


@dataclass(frozen=True)
class Selection:
    """What to train on in one mini-batch.

    Attributes:
        sample_mask: ``[B]`` bool, kept samples (Q2 or Q4).
        token_mask: ``[B, T]`` bool, kept trainable tokens of kept samples.
        q2: ``[B]`` bool, kept samples whose tokens were pruned.
        quadrant: ``[B]`` int64, each sample's index into `QUADRANTS` or `NO_TARGET`.
        filled: ``[B]`` bool, kept samples that the fill-up added.
        ppl: ``[B]`` float64 sample perplexity (NaN where no trainable token).
        ent: ``[B]`` float64 sample mean entropy in nats (NaN likewise).
        triage: the `Triage` this came from (over the global mini-batch when gathered;
            the per-sample fields above are this rank's rows of it).
        rows: ``[B_all, 3]`` float64 (PPL, Ent, valid) of every sample of the triage (every
            rank's when gathered), in the triage's order: what joins a triage window.
        stats: ``qtuning/``-prefixed Python floats for logging.
    """

    sample_mask: Tensor
    token_mask: Tensor
    q2: Tensor
    quadrant: Tensor
    filled: Tensor
    ppl: Tensor
    ent: Tensor
    triage: Triage
    rows: Tensor
    stats: dict[str, float]


def _check_finite(nll: Tensor, entropy: Tensor, mask: Tensor) -> None:
    finite = torch.isfinite(nll) & torch.isfinite(entropy)
    if bool((mask & ~finite).any()):
        raise FloatingPointError(
            "qtuning: non-finite NLL or entropy at a trainable position; the model's hidden "
            "states or LM head hold NaN/inf (training has diverged or the inputs are corrupt)"
        )


def select(
    nll: Tensor,
    entropy: Tensor,
    mask: Tensor,
    config: QTuningConfig,
    *,
    sample_gather: Optional[SampleGather] = None,
    earlier: Optional[Tensor] = None,
) -> Selection:
    """Triage the samples of a mini-batch and prune the tokens of its Q2 samples.

    The B rows are this rank's samples of the mini-batch: under ``triage_scope: step`` its
    micro-batches of the optimizer step, concatenated (packed rows as their segments); under
    ``micro_batch`` one micro-batch. ``sample_gather`` adds the other ranks' samples.

    Args:
        nll: ``[B, T]`` per-token negative log-likelihood in nats (`ops.token_stats`).
        entropy: ``[B, T]`` per-token predictive entropy in nats.
        mask: ``[B, T]`` bool, trainable positions (``labels != -100`` after the shift).
        config: the `QTuningConfig` (ratios, lambda, bisection settings).
        sample_gather: in data-parallel training, gathers every rank's per-sample
            statistics so that the thresholds are those of the global mini-batch.
        earlier: ``[M, 2]`` (PPL, Ent) of the triage window's earlier steps (`TriageWindow`),
            pooled for the thresholds (docs/algorithm.md section 4a); None: this mini-batch alone.

    Raises:
        FloatingPointError: a trainable position has a non-finite NLL or entropy.
    """
    mask = mask.bool()
    _check_finite(nll, entropy, mask)
    ppl, ent = sample_stats(nll, entropy, mask)
    valid = mask.any(dim=1)

    local = torch.stack([ppl, ent, valid.to(torch.float64)], dim=1)
    rows, offset = (local, 0) if sample_gather is None else sample_gather(local)
    triage = triage_with_config(rows[:, 0], rows[:, 1], rows[:, 2].bool(), config, earlier)
    mine = slice(offset, offset + nll.shape[0])
    sample_mask, q2 = triage.keep[mine].to(mask.device), triage.q2[mine].to(mask.device)

    token_mask = prune_tokens(
        nll,
        mask,
        q2,
        config.token_keep_ratio,
        context_weight=config.context_weight,
        prune_highest=config.prune_highest_scores,
    )
    token_mask &= sample_mask.unsqueeze(1)
    stats = selection_stats(rows, triage, mask, sample_mask, token_mask)
    if config.triage_window > 1:
        stats["qtuning/window_samples"] = float(triage.pooled)
    return Selection(
        sample_mask, token_mask, q2, triage.quadrant[mine], triage.filled[mine], ppl, ent, triage, rows, stats
    )


def triage_with_config(
    ppl: Tensor, ent: Tensor, valid: Tensor, config: QTuningConfig, earlier: Optional[Tensor] = None
) -> Triage:
    """`triage_samples` of ``[B]`` statistics at the configured ratio, bisection settings and budget
    rule, the thresholds pooled with ``earlier`` (a triage window's earlier samples) where given."""
    return triage_samples(
        ppl,
        ent,
        config.sample_keep_ratio,
        max_iters=config.max_bisect_iters,
        tol=config.bisect_tolerance,
        valid=valid,
        earlier=earlier,
        hold_budget=config.holds_budget,
    )


def selection_stats(
    rows: Tensor, triage: Triage, mask: Tensor, sample_mask: Tensor, token_mask: Tensor
) -> dict[str, float]:
    """The ``qtuning/`` logging dictionary of one selection.

    Sample counts and means are over ``rows`` (the global mini-batch when
    gathered), the quadrants those of ``triage.quadrant``; token counts are over
    this rank's ``mask``. Every tensor value reaches the host in one transfer
    (one device sync on CUDA).
    """
    ppl, ent, valid = rows[:, 0], rows[:, 1], rows[:, 2].bool()
    keep = triage.keep.to(rows.device)
    dropped = valid & ~keep
    kept_valid = keep & valid
    sums = {
        **{name.lower(): triage.quadrant == index for index, name in enumerate(QUADRANTS)},
        "filled": triage.filled,
        "trimmed": triage.trimmed,
        "without_target": ~valid,
        "kept": keep,
        "valid": valid,
        "trainable": mask,
        "in_kept": mask & sample_mask.unsqueeze(1),
        "kept_tokens": token_mask,
        "n_kept": kept_valid,
        "ppl_kept": torch.where(kept_valid, ppl, 0.0),
        "ent_kept": torch.where(kept_valid, ent, 0.0),
        "n_dropped": dropped,
        "ppl_dropped": torch.where(dropped, ppl, 0.0),
        "ent_dropped": torch.where(dropped, ent, 0.0),
    }
    on_host = dict(zip(sums, torch.stack([t.to(torch.float64).sum() for t in sums.values()]).tolist()))
    trainable, in_kept, kept_tokens = on_host["trainable"], on_host["in_kept"], on_host["kept_tokens"]
    stats = {
        "qtuning/samples_q1": on_host["q1"],
        "qtuning/samples_q2": on_host["q2"],
        "qtuning/samples_q3": on_host["q3"],
        "qtuning/samples_q4": on_host["q4"],
        "qtuning/samples_middle": on_host["middle"],
        "qtuning/samples_filled": on_host["filled"],
        "qtuning/samples_trimmed": on_host["trimmed"],
        "qtuning/samples_without_target": on_host["without_target"],
        "qtuning/alpha": triage.alpha,
        "qtuning/ppl_hi": triage.ppl_hi,
        "qtuning/ppl_lo": triage.ppl_lo,
        "qtuning/ent_lo": triage.ent_lo,
        "qtuning/ent_hi": triage.ent_hi,
        "qtuning/bisect_iters": float(triage.iterations),
        "qtuning/kept_sample_frac": on_host["kept"] / max(1.0, on_host["valid"]),
        "qtuning/kept_token_frac": kept_tokens / in_kept if in_kept else 0.0,
        "qtuning/trained_token_frac": kept_tokens / trainable if trainable else 0.0,
        "qtuning/tokens_trainable": trainable,
        "qtuning/tokens_kept": kept_tokens,
    }
    for name in ("kept", "dropped"):
        count = on_host[f"n_{name}"]
        if count:
            stats[f"qtuning/ppl_{name}_mean"] = on_host[f"ppl_{name}"] / count
            stats[f"qtuning/ent_{name}_mean"] = on_host[f"ent_{name}"] / count
    return stats

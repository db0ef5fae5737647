"""Q-Tuning's selection transcribed from SPEC sections 2, 4 and 5, apart from `qtuning_plugin`.

Plain Python floats and lists, one sample at a time, in the order the SPEC states the rules;
the one primitive borrowed is the quantile, which the SPEC defines as torch's (linear
interpolation, ``torch.quantile``'s default). The tests (`tests/test_triage.py`, the end-to-end
`integration_tests/test_axolotl_train.py`) and the quality benchmark's fidelity check
(`benchmarks/quality/run.py`) compare the package against it; `check_selection_records` checks the
selections that the end-to-end runs record (Axolotl and LLaMA-Factory), and, where the probe
redid a triage with every micro-batch scored alone (`scored_alone`), that it selects the same;
`check_decision_lines` checks the lines of a run's ``qtuning_decisions.jsonl`` (``log_decisions``)
likewise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch


@dataclass
class ReferenceTriage:
    """SPEC section 4's outcome for the valid samples of one mini-batch, in batch order."""

    q2: list[bool]
    q4: list[bool]
    keep: list[bool]
    filled: list[bool]
    # SPEC section 3's table by the last iterate's thresholds: kept "Q2"/"Q4"; dropped "Q1" (PPL
    # above ppl_hi, Ent above ent_hi), "Q3" (PPL at most ppl_lo, Ent at most ent_lo) or "middle".
    quadrant: list[str]
    alpha: float
    iterations: int
    target: int
    # docs/algorithm.md section 4a: qualified by the thresholds, dropped to hold the budget.
    trimmed: list[bool] = field(default_factory=list)


def quantile(values: Sequence[float], q: float) -> float:
    """``quantile(values, q)`` with linear interpolation (SPEC 4.2: as numpy/torch ``quantile``)."""
    return torch.quantile(torch.tensor(values, dtype=torch.float64), q).item()


def _min_max(values: list[float]) -> list[float]:
    low, high = min(values), max(values)
    if high - low < 1e-12:
        return [0.0] * len(values)
    return [(value - low) / (high - low) for value in values]


def reference_triage(
    ppl: Sequence[float], ent: Sequence[float], r_sample: float, *, max_iters: int = 10, tol: float = 0.01
) -> ReferenceTriage:
    """Algorithm 1 and the fill-up (SPEC 4.1-4.4) on samples that all have trainable tokens."""
    ppl, ent = [float(p) for p in ppl], [float(e) for e in ent]
    n = len(ppl)
    target = max(1, round(r_sample * n))
    lo, hi = 0.0, 0.49
    for iteration in range(1, max_iters + 1):
        a = (lo + hi) / 2
        ppl_hi, ppl_lo = quantile(ppl, 1 - a), quantile(ppl, a)
        ent_lo, ent_hi = quantile(ent, a), quantile(ent, 1 - a)
        q2 = [p > ppl_hi and e <= ent_lo for p, e in zip(ppl, ent)]
        q4 = [p <= ppl_lo and e > ent_hi for p, e in zip(ppl, ent)]
        r = (sum(q2) + sum(q4)) / n
        if abs(r - r_sample) < tol:
            break
        if r < r_sample:
            lo = a
        else:
            hi = a
    filled = [False] * n
    kept = sum(q2) + sum(q4)
    if kept < target:
        p, e = _min_max(ppl), _min_max(ent)
        support = [max(p[i] - e[i], e[i] - p[i]) for i in range(n)]
        others = sorted((i for i in range(n) if not (q2[i] or q4[i])), key=lambda i: (-support[i], i))
        for i in others[: target - kept]:
            filled[i] = True
            if p[i] - e[i] >= e[i] - p[i]:
                q2[i] = True
            else:
                q4[i] = True
    keep = [a or b for a, b in zip(q2, q4)]
    quadrant = []
    for i in range(n):
        if q2[i] or q4[i]:
            quadrant.append("Q2" if q2[i] else "Q4")
        elif ppl[i] > ppl_hi and ent[i] > ent_hi:
            quadrant.append("Q1")
        elif ppl[i] <= ppl_lo and ent[i] <= ent_lo:
            quadrant.append("Q3")
        else:
            quadrant.append("middle")
    return ReferenceTriage(q2, q4, keep, filled, quadrant, a, iteration, target)


def reference_pooled_triage(
    ppl: Sequence[float],
    ent: Sequence[float],
    earlier_ppl: Sequence[float],
    earlier_ent: Sequence[float],
    r_sample: float,
    *,
    hold: bool,
    max_iters: int = 10,
    tol: float = 0.01,
) -> ReferenceTriage:
    """docs/algorithm.md section 4a, for one step's samples (all with trainable tokens): the quantiles,
    the bisection's kept fraction and the fill-up's min-max normalisation over the pool (the step's
    samples and the ``earlier`` ones of the window), the step keeping its own K; with ``hold``, of
    more than K qualifying samples the K of highest support stay (ties: the lower index)."""
    step = [(float(p), float(e)) for p, e in zip(ppl, ent)]
    pool = step + [(float(p), float(e)) for p, e in zip(earlier_ppl, earlier_ent)]
    pool_ppl, pool_ent = [p for p, _ in pool], [e for _, e in pool]
    n = len(step)
    target = max(1, round(r_sample * n))
    # Section 4 step 2 on the pool: SPEC's bisection (its fill-up does not move the last iterate).
    on_pool = reference_triage(pool_ppl, pool_ent, r_sample, max_iters=max_iters, tol=tol)
    a, iteration = on_pool.alpha, on_pool.iterations
    ppl_hi, ppl_lo = quantile(pool_ppl, 1 - a), quantile(pool_ppl, a)
    ent_lo, ent_hi = quantile(pool_ent, a), quantile(pool_ent, 1 - a)

    def normalised(value: float, values: list[float]) -> float:
        low, high = min(values), max(values)
        return 0.0 if high - low < 1e-12 else (value - low) / (high - low)

    q2 = [p > ppl_hi and e <= ent_lo for p, e in step]
    q4 = [p <= ppl_lo and e > ent_hi for p, e in step]
    side = [normalised(p, pool_ppl) - normalised(e, pool_ent) for p, e in step]  # p - e
    support = [max(d, -d) for d in side]
    filled, trimmed = [False] * n, [False] * n
    kept = [i for i in range(n) if q2[i] or q4[i]]
    if len(kept) < target:
        others = sorted((i for i in range(n) if i not in kept), key=lambda i: (-support[i], i))
        for i in others[: target - len(kept)]:
            filled[i] = True
            q2[i], q4[i] = side[i] >= -side[i], side[i] < -side[i]
    elif hold and len(kept) > target:
        for i in sorted(kept, key=lambda i: (-support[i], i))[target:]:
            trimmed[i], q2[i], q4[i] = True, False, False
    quadrant = []
    for i, (p, e) in enumerate(step):
        if q2[i] or q4[i]:
            quadrant.append("Q2" if q2[i] else "Q4")
        elif p > ppl_hi and e > ent_hi:
            quadrant.append("Q1")
        elif p <= ppl_lo and e <= ent_lo:
            quadrant.append("Q3")
        else:
            quadrant.append("middle")
    keep = [a or b for a, b in zip(q2, q4)]
    return ReferenceTriage(q2, q4, keep, filled, quadrant, a, iteration, target, trimmed)


def reference_kept_tokens(
    nll: Sequence[float], mask: Sequence[bool], r_token: float, lam: float = 0.5, prune_highest: bool = True
) -> list[bool]:
    """SPEC section 5 for one Q2 sample: keep its ``max(1, floor(r_token * L))`` lowest-scoring
    trainable positions (ties: the earlier one), ``s_i = (1 - lam) ppl_i + lam (ppl_{i-1} + ppl_{i+1})``
    with neighbours outside the trainable span counting 0."""
    positions = [i for i, m in enumerate(mask) if m]
    ppl = {i: math.exp(float(nll[i])) for i in positions}
    scores = {
        i: (1 - lam) * ppl[i] + lam * (ppl.get(i - 1, 0.0) + ppl.get(i + 1, 0.0)) for i in positions
    }
    budget = max(1, math.floor(r_token * len(positions)))
    ranked = sorted(positions, key=lambda i: ((scores[i] if prune_highest else -scores[i]), i))
    kept = set(ranked[:budget])
    return [i in kept for i in range(len(mask))]


def reference_select(nll, ent, mask, r_sample, r_token, lam=0.5, prune_highest=True):
    """SPEC sections 2, 4 and 5 on one mini-batch of ``[B, T]`` tensors.

    Returns ``(keep [B], q2 [B], token_mask [B, T])`` bool tensors; samples without trainable
    positions take no part (never kept, not counted).
    """
    nll, ent, mask = nll.double().tolist(), ent.double().tolist(), mask.bool().tolist()
    rows = [b for b in range(len(mask)) if any(mask[b])]
    ppl = [math.exp(sum(n for n, m in zip(nll[b], mask[b]) if m) / sum(mask[b])) for b in rows]
    sample_ent = [sum(e for e, m in zip(ent[b], mask[b]) if m) / sum(mask[b]) for b in rows]
    keep = [False] * len(mask)
    q2 = [False] * len(mask)
    tokens = [[False] * len(row) for row in mask]
    if rows:
        triage = reference_triage(ppl, sample_ent, r_sample)
        for j, b in enumerate(rows):
            keep[b], q2[b] = triage.keep[j], triage.q2[j]
            if q2[b]:
                tokens[b] = reference_kept_tokens(nll[b], mask[b], r_token, lam, prune_highest)
            elif keep[b]:
                tokens[b] = list(mask[b])
    return torch.tensor(keep), torch.tensor(q2), torch.tensor(tokens, dtype=torch.bool).view(len(mask), -1)


def selection_record(event) -> dict:
    """What an end-to-end probe records of one triage (a `qtuning_plugin.SelectionEvent`, from the
    trainer's engine listeners) for `check_selection_records`: per sample of this rank, its PPL,
    Ent, trainable-token count L, kept-token count and kept/Q2 flags; and the triage's statistics."""
    selection = event.selection
    trainable = torch.cat([batch.per_sample(batch.mask, False).sum(dim=1) for batch in event.micro_batches])
    return {
        "ppl": selection.ppl.tolist(),
        "ent": selection.ent.tolist(),
        "trainable": trainable.tolist(),
        "kept_tokens": selection.token_mask.sum(dim=1).tolist(),
        "keep": selection.sample_mask.tolist(),
        "q2": selection.q2.tolist(),
        "stats": event.stats,
    }


def scored_alone(engine, model, event) -> dict:
    """The event's triage redone with each micro-batch scored in a forward of its own (as before
    ``scoring_batch_tokens`` let a step's micro-batches share scoring forwards), on the model as it
    is when the listeners are called (before the step's training passes): its kept and Q2 flags,
    whether its kept tokens are the event's, and the largest differences of per-sample PPL
    (relative) and Ent (absolute) from the event's."""
    batches = event.micro_batches
    alone = engine.select(batches, [engine.score(model, batch) for batch in batches], event.step).selection
    valid = torch.isfinite(alone.ppl) & torch.isfinite(event.selection.ppl)
    relative_ppl = ((alone.ppl - event.selection.ppl).abs() / alone.ppl.abs())[valid]
    entropy = (alone.ent - event.selection.ent).abs()[valid]
    return {
        "keep": alone.sample_mask.tolist(),
        "q2": alone.q2.tolist(),
        "same_kept_tokens": bool(torch.equal(alone.token_mask, event.selection.token_mask)),
        "ppl_max_rel_diff": float(relative_ppl.max()) if relative_ppl.numel() else 0.0,
        "ent_max_abs_diff": float(entropy.max()) if entropy.numel() else 0.0,
    }


# A step's micro-batches scored together differ from each scored alone by float rounding only
# (another attention kernel for a padded batch, other matmul shapes): float32 CPU runs measure
# ~1e-7 relative on PPL and ~1e-6 nats on Ent; this is a thousand times that, and far below
# what a wrong row, position or mask moves (percents).
ALONE_PPL_RTOL, ALONE_ENT_ATOL = 1e-4, 1e-3


def check_selection_records(records: Sequence[dict], sample_keep: float, token_keep: float) -> None:
    """Each recorded selection is SPEC's triage and token budget of its samples' (PPL, Ent).

    A record (as the end-to-end probes write them, one per `select` call) lists per sample:
    ``ppl``, ``ent``, ``trainable`` (its trainable-token count L), ``kept_tokens``, ``keep``
    and ``q2``. Samples without a trainable token take no part in the triage.
    """
    for step, record in enumerate(records, start=1):
        valid = [length > 0 for length in record["trainable"]]
        ppl = [p for p, v in zip(record["ppl"], valid) if v]
        ent = [e for e, v in zip(record["ent"], valid) if v]
        reference = reference_triage(ppl, ent, sample_keep)
        assert [k for k, v in zip(record["keep"], valid) if v] == reference.keep, f"step {step}"
        assert [q for q, v in zip(record["q2"], valid) if v] == reference.q2, f"step {step}"
        for i, length in enumerate(record["trainable"]):
            if not record["keep"][i]:
                expected = 0
            elif record["q2"][i]:
                expected = max(1, math.floor(token_keep * length))
            else:
                expected = length
            assert int(record["kept_tokens"][i]) == expected, (step, i, length, record["q2"][i])
        alone = record.get("alone")  # the probe's `scored_alone`, where a triage spans micro-batches
        if alone is not None:
            assert (alone["keep"], alone["q2"], alone["same_kept_tokens"]) == (record["keep"], record["q2"], True), step
            assert alone["ppl_max_rel_diff"] <= ALONE_PPL_RTOL and alone["ent_max_abs_diff"] <= ALONE_ENT_ATOL, alone


def check_decision_lines(lines: Sequence[dict], sample_keep: float, token_keep: float) -> None:
    """The lines of a ``log_decisions`` file, one triage per optimizer step: each step's lines are
    SPEC's triage of their logged (PPL, Ent) (quadrant, fill-up) and token budget (kept tokens)."""
    steps = [line["step"] for line in lines]
    assert steps == sorted(steps), steps
    for step in sorted(set(steps)):
        group = [line for line in lines if line["step"] == step]
        reference = reference_triage([line["ppl"] for line in group], [line["ent"] for line in group], sample_keep)
        assert [line["quadrant"] for line in group] == reference.quadrant, step
        assert [line["filled"] for line in group] == reference.filled, step
        for line in group:
            length = line["trainable_tokens"]
            expected = {"Q2": max(1, math.floor(token_keep * length)), "Q4": length}.get(line["quadrant"], 0)
            assert line["kept_tokens"] == expected, (step, line)


DECISION_STATISTICS = ("ppl", "ent")


def check_same_decisions(got: Sequence[dict], expected: Sequence[dict], rel: float = 1e-6) -> None:
    """Two decision logs line for line: the same fields, PPL and Ent within ``rel``."""
    def decisions(lines):
        return [{key: value for key, value in line.items() if key not in DECISION_STATISTICS} for line in lines]

    assert decisions(got) == decisions(expected)
    for got_line, expected_line in zip(got, expected):
        for key in DECISION_STATISTICS:
            assert math.isclose(got_line[key], expected_line[key], rel_tol=rel), (key, got_line, expected_line)


def check_decisions_of_selections(lines: Sequence[dict], selections: Sequence[dict]) -> None:
    """A decision log holds, step after step (one triage per optimizer step), the samples with a
    trainable token of the selections an end-to-end probe recorded (`selection_record`)."""
    expected = [
        (step, ppl, ent, length, kept)
        for step, record in enumerate(selections, start=1)
        for ppl, ent, length, kept in zip(record["ppl"], record["ent"], record["trainable"], record["kept_tokens"])
        if length > 0
    ]
    got = [(line["step"], line["ppl"], line["ent"], line["trainable_tokens"], line["kept_tokens"]) for line in lines]
    assert got == expected


def check_decision_keys(lines: Sequence[dict], rows: Sequence[dict]) -> None:
    """Each line's key is that of a tokenised dataset row (`sample_key` of its ``input_ids``), and its
    trainable tokens are that row's (``labels`` other than -100 after the first position)."""
    from qtuning_plugin.sample_key import sample_key

    trainable = {sample_key(row["input_ids"]): sum(label != -100 for label in row["labels"][1:]) for row in rows}
    unknown = [line for line in lines if line["key"] not in trainable]
    assert not unknown, unknown[:3]
    assert [line["trainable_tokens"] for line in lines] == [trainable[line["key"]] for line in lines]

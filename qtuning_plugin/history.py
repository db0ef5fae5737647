"""`QTuningHistory`: everything Q-Tuning remembers across training steps, in one place.

The trainer mixin owns one (``trainer.qtuning_history``). It holds

* the statistics of the micro-batches since the last logging step (averaged
  into the ``qtuning/`` metrics at the next one),
* the running token totals behind ``qtuning/tokens_saved_frac_cumulative``,
* one entry per logging step (the logged ``qtuning/`` metrics and the step),
  for the quadrant-fraction plot,
* a bounded reservoir of the most recent per-sample points (PPL, Ent,
  quadrant) and the last mini-batch's thresholds, for the EU-plane plot.

It is saved as ``qtuning_state.json`` in every checkpoint and read back on
resume, so that a resumed run logs and plots as the uninterrupted one would.
Token totals are this process's (the main process's when it logs); sample
counts are over the global mini-batch in data-parallel training.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict, deque
from typing import Any, Optional, Sequence

STATE_NAME = "qtuning_state.json"
STATE_VERSION = 1
# Per-sample points kept for the EU-plane plot (the most recent ones).
MAX_POINTS = 2000
QUADRANTS = ("Q1", "Q2", "Q3", "Q4", "middle")
THRESHOLDS = ("ppl_hi", "ppl_lo", "ent_lo", "ent_hi")


def quadrant_labels(
    ppl: Sequence[float], ent: Sequence[float], keep: Sequence[bool], q2: Sequence[bool], triage: Any
) -> tuple[list[str], list[bool]]:
    """Each sample's quadrant name (one of `QUADRANTS`, or "" without trainable tokens) and fill-up flag.

    Args:
        ppl, ent: the samples' statistics (NaN without trainable tokens).
        keep, q2: whether each was kept, and kept as Q2 (tokens pruned).
        triage: the `Triage` that decided (its last iterate's thresholds).

    Kept samples are Q2 or Q4; a kept sample outside the strict quadrant of
    the thresholds was added by the fill-up. Dropped samples are Q1, Q3 or
    the middle band, as in `qtuning_plugin.core.select.selection_stats`.
    """
    labels, filled = [], []
    for p, e, kept, is_q2 in zip(ppl, ent, keep, q2):
        if math.isnan(p) or math.isnan(e):
            labels.append("")
            filled.append(False)
        elif kept:
            strict_q2 = p > triage.ppl_hi and e <= triage.ent_lo
            strict_q4 = p <= triage.ppl_lo and e > triage.ent_hi
            labels.append("Q2" if is_q2 else "Q4")
            filled.append(not (strict_q2 if is_q2 else strict_q4))
        else:
            if p > triage.ppl_hi and e > triage.ent_hi:
                labels.append("Q1")
            elif p <= triage.ppl_lo and e <= triage.ent_lo:
                labels.append("Q3")
            else:
                labels.append("middle")
            filled.append(False)
    return labels, filled


class QTuningHistory:
    """The per-step state of Q-Tuning training (see the module docstring)."""

    def __init__(self, max_points: int = MAX_POINTS):
        self.max_points = max_points
        self.reset()

    def reset(self) -> None:
        """Forget everything (a new training run)."""
        self.pending: dict[str, list[float]] = defaultdict(list)
        self.tokens = {"trainable": 0.0, "kept": 0.0}
        self.steps: list[dict[str, float]] = []
        self.points: deque = deque(maxlen=self.max_points)
        self.thresholds: Optional[dict[str, float]] = None

    # ---------------------------------------------------------------- record
    def record(self, stats: dict[str, float], trainable_tokens: float, kept_tokens: float) -> None:
        """One micro-batch's ``qtuning/`` statistics and its trainable and trained token counts."""
        for key, value in stats.items():
            self.pending[key].append(float(value))
        self.tokens["trainable"] += float(trainable_tokens)
        self.tokens["kept"] += float(kept_tokens)

    def record_samples(self, selection: Any, step: int) -> None:
        """The samples of one `Selection` (this rank's) into the EU-plane reservoir."""
        ppls, ents = selection.ppl.tolist(), selection.ent.tolist()
        labels, filled = quadrant_labels(
            ppls, ents, selection.sample_mask.tolist(), selection.q2.tolist(), selection.triage
        )
        for ppl, ent, label, fill in zip(ppls, ents, labels, filled):
            if label:
                self.points.append([ppl, ent, label, fill, step])
        triage = selection.triage
        if not math.isnan(triage.alpha):
            self.thresholds = {name: float(getattr(triage, name)) for name in THRESHOLDS}
            self.thresholds["step"] = step

    def flush(self, step: int) -> dict[str, float]:
        """The metrics of a logging step: the mean of each statistic since the last one, plus running totals.

        Appends them to `steps` (with ``step``) when any micro-batch was recorded.
        """
        metrics = {key: sum(values) / len(values) for key, values in self.pending.items() if values}
        recorded = bool(self.pending)
        self.pending.clear()
        if self.tokens["trainable"]:
            metrics["qtuning/tokens_saved_frac_cumulative"] = 1.0 - self.tokens["kept"] / self.tokens["trainable"]
        if recorded:
            self.steps.append({"step": step, **metrics})
        return metrics

    # ------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "pending": {key: list(values) for key, values in self.pending.items()},
            "tokens": dict(self.tokens),
            "steps": list(self.steps),
            "points": list(self.points),
            "thresholds": self.thresholds,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"qtuning: unsupported {STATE_NAME} version {state.get('version')!r}")
        self.reset()
        for key, values in state["pending"].items():
            self.pending[key].extend(values)
        self.tokens.update(state["tokens"])
        self.steps.extend(state["steps"])
        self.points.extend(state["points"])
        self.thresholds = state["thresholds"]

    def save(self, directory: str) -> str:
        """Write ``directory/qtuning_state.json``; returns its path."""
        path = os.path.join(directory, STATE_NAME)
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(self.state_dict(), handle)
        return path

    def load(self, directory: str) -> bool:
        """Read ``directory/qtuning_state.json`` if there is one; whether it was found."""
        path = os.path.join(directory, STATE_NAME)
        if not os.path.isfile(path):
            return False
        with open(path, encoding="utf-8") as handle:
            self.load_state_dict(json.load(handle))
        return True

    # -------------------------------------------------------------- for plots
    def quadrant_fractions(self) -> dict[str, list[float]]:
        """``{"step": [...], "Q1": [...], ..., "middle": [...]}``: each logged step's fraction of
        samples per quadrant (averaged over its micro-batches); warm-up steps are left out."""
        out: dict[str, list[float]] = {"step": [], **{name: [] for name in QUADRANTS}}
        keys = {name: f"qtuning/samples_{name.lower()}" for name in QUADRANTS}
        for entry in self.steps:
            counts = {name: entry.get(key) for name, key in keys.items()}
            if any(value is None for value in counts.values()):
                continue
            total = sum(counts.values())
            if total <= 0:
                continue
            out["step"].append(entry["step"])
            for name in QUADRANTS:
                out[name].append(counts[name] / total)
        return out


"""The real-model track's cost model: training cost in tokens, never in seconds.

A training run's cost is counted, not timed: the tokens of every forward the model runs while it
trains, split into forward-only tokens (Q-Tuning's gradient-free scoring forward) and
forward+backward tokens (every training pass), weighted by ``fb_per_forward``, the cost of a
forward+backward token in forward-only tokens:

    cost = forward_tokens + fb_per_forward * forward_backward_tokens

A token is a position the attention mask attends (padding is not counted). The optimizer's
update, whose cost does not grow with the tokens, is counted (``updates``) but not charged.
`calibrate` measures ``fb_per_forward`` on the model in alternating rounds.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch


@dataclass
class Counts:
    """Tokens and passes of a run's training-mode forwards, and its optimizer updates."""

    forward_tokens: int = 0
    forward_backward_tokens: int = 0
    forward_passes: int = 0
    forward_backward_passes: int = 0
    updates: int = 0

    def cost(self, fb_per_forward: float) -> float:
        return self.forward_tokens + fb_per_forward * self.forward_backward_tokens


@dataclass
class TokenCounter:
    """Counts the tokens of ``model``'s forwards in training mode (a forward pre-hook): with
    gradient enabled as forward+backward, without as forward-only. Evaluation (``model.eval()``)
    is not counted."""

    model: torch.nn.Module
    counts: Counts = field(default_factory=Counts)

    def __post_init__(self):
        self.handle = self.model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs) -> None:
        if not module.training:
            return
        mask = kwargs.get("attention_mask")
        tokens = int(mask.ne(0).sum()) if mask is not None else (kwargs.get("input_ids", args[0] if args else None)).numel()
        if torch.is_grad_enabled():
            self.counts.forward_backward_tokens += tokens
            self.counts.forward_backward_passes += 1
        else:
            self.counts.forward_tokens += tokens
            self.counts.forward_passes += 1


def calibrate(model, batch: dict, score, rounds: int, warmup: int = 2) -> dict:
    """``fb_per_forward`` measured on ``batch``: per round, the CPU time of the scoring forward
    (``score(model, batch)``, no gradient) and of a forward+backward of the model's own loss on the
    same batch, in alternating order; the ratio of each round, and their median."""
    model.train()

    def forward_only() -> float:
        start = time.process_time()
        with torch.no_grad():
            score(model, batch)
        return time.process_time() - start

    def forward_backward() -> float:
        start = time.process_time()
        model(**batch).loss.backward()
        elapsed = time.process_time() - start
        model.zero_grad(set_to_none=True)
        return elapsed

    ratios, seconds = [], []
    for r in range(warmup + rounds):
        if r % 2:
            fb, f = forward_backward(), forward_only()
        else:
            f, fb = forward_only(), forward_backward()
        if r >= warmup:
            ratios.append(fb / f)
            seconds.append((f, fb))
    return {"fb_per_forward": statistics.median(ratios), "ratios": [round(x, 3) for x in ratios],
            "forward_cpu_s": [round(f, 3) for f, _ in seconds], "forward_backward_cpu_s": [round(fb, 3) for _, fb in seconds],
            "rounds": rounds, "warmup_rounds": warmup, "batch_rows": int(batch["input_ids"].shape[0]),
            "batch_tokens": int(batch["attention_mask"].sum())}

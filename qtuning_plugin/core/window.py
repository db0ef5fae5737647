"""`TriageWindow`: the (PPL, Ent) of the samples of the last optimizer steps, on which a step's
triage thresholds rest with ``triage_window`` > 1 (docs/algorithm.md section 4a)."""

from __future__ import annotations

from collections import deque
from typing import Optional

import torch
from torch import Tensor


class TriageWindow:
    """The valid samples' (PPL, Ent) of the ``steps - 1`` most recent triaged steps.

    A step's triage pools them with its own samples (`earlier`), then the step joins the window
    (`push`), the oldest step leaving it. ``steps = 1`` holds nothing: the paper's rule.
    """

    def __init__(self, steps: int):
        if steps < 1:
            raise ValueError(f"a triage window spans at least 1 step; got {steps}")
        self.steps = steps
        self._earlier: deque[Tensor] = deque(maxlen=steps - 1)

    def earlier(self) -> Optional[Tensor]:
        """``[M, 2]`` float64 (PPL, Ent) of the earlier steps' samples, oldest first; None when none."""
        return torch.cat(list(self._earlier)) if self._earlier else None

    def push(self, rows: Tensor) -> None:
        """A triaged step's ``[B, 3]`` rows (PPL, Ent, valid) of every rank: its valid samples join."""
        if self._earlier.maxlen:
            rows = rows.detach().to("cpu", torch.float64)
            self._earlier.append(rows[rows[:, 2].bool(), :2].clone())

    def clear(self) -> None:
        self._earlier.clear()

    # ------------------------------------------------------------ checkpoint
    def state_dict(self) -> list[list[list[float]]]:
        """Per earlier step, oldest first, its samples' ``[PPL, Ent]`` (floats round-trip JSON exactly)."""
        return [step.tolist() for step in self._earlier]

    def load_state_dict(self, steps: list[list[list[float]]]) -> None:
        """The steps of `state_dict`; of more than this window holds, the most recent."""
        self.clear()
        if self._earlier.maxlen:
            self._earlier.extend(torch.tensor(step, dtype=torch.float64).reshape(-1, 2) for step in steps)

"""The quality benchmark's trainers: the plugin as shipped, recorded, and the comparison arms.

Every arm trains through `transformers.Trainer` with `QTuningTrainerMixin`, the loss path
Axolotl's trainer takes. The datasets yield an ``idx`` column (the item's index in the SFT set)
that `IndexedCollator` takes out of each micro-batch before the model sees it, queueing it for
the recorder: the plugin's selections arrive through its public ``qtuning_on_selection`` hook,
micro-batch after micro-batch in the order the collator made them.

The random and oracle arms choose at the data level: their collator keeps a random 25% of each
micro-batch (or, with the ground truth, the clean items first), and the kept rows train on the
plain loss (Q-Tuning disabled): no scoring pass, every token of the kept rows.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable, Optional

import torch
from transformers import Trainer, TrainerCallback
from transformers.data.data_collator import default_data_collator

from qtuning_plugin import QTuningTrainerMixin
from qtuning_plugin.hf.callbacks import QTuningPlotCallback

RANK = {"fresh": 0, "redundant": 1, "corrupted": 2}


class IndexedCollator:
    """`default_data_collator` without the ``idx`` column, which is queued in ``pending`` as
    ``(idx [B], keep [B] bool)``: the rows of the micro-batch, and the ones handed on.

    With ``sample_keep_ratio`` set, only ``max(1, round(ratio * B))`` rows are handed on: random
    ones (seeded), or with ``oracle`` ("oracle_clean" / "oracle_25") and ``kinds`` (the SFT set's
    ground-truth type per item) fresh items first, then redundant, corrupted last, randomly
    within a type; "oracle_clean" keeps every item that is not corrupted.
    """

    def __init__(self, seed: int, sample_keep_ratio: Optional[float] = None, oracle: Optional[str] = None,
                 kinds: Optional[list[str]] = None):
        self.pending: deque = deque()
        self.sample_keep_ratio = sample_keep_ratio
        self.oracle, self.kinds = oracle, kinds
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, features: list[dict]) -> dict:
        idx = torch.stack([f["idx"] for f in features])
        keep = torch.ones(len(features), dtype=torch.bool)
        if self.sample_keep_ratio is not None:
            k = max(1, round(self.sample_keep_ratio * len(features)))
            order = torch.randperm(len(features), generator=self.generator).tolist()
            if self.oracle:
                order.sort(key=lambda j: RANK[self.kinds[int(idx[j])]])
                if self.oracle == "oracle_clean":
                    k = max(1, sum(self.kinds[int(i)] != "corrupted" for i in idx))
            keep[:] = False
            keep[order[:k]] = True
        self.pending.append((idx, keep))
        return default_data_collator([{k: v for k, v in f.items() if k != "idx"} for f, kept in zip(features, keep) if kept])


class QTuningTrainer(QTuningTrainerMixin, Trainer):
    """The plugin as shipped (either triage scope, or disabled), recording per micro-batch the
    dataset indices and what the loss kept, and counting the tokens with gradient."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, qtuning_on_selection=self._record_selection, **kwargs)
        # The per-run training plots of the plugin cost a second of matplotlib per arm; not needed here.
        self.remove_callback(QTuningPlotCallback)
        self.records = []
        self.tokens_with_gradient = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training and not self.qtuning_config.enabled:  # full data, or rows chosen by the collator
            idx, keep = self.data_collator.pending.popleft()
            self.tokens_with_gradient += int((inputs["labels"][:, 1:] != -100).sum())
            self.records.append({"idx": idx, "keep": keep, "step": self.state.global_step})
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def _record_selection(self, event) -> None:
        parts = [self.data_collator.pending.popleft() for _ in event.micro_batches]
        sel = event.selection
        self.tokens_with_gradient += event.kept_tokens
        self.records.append({
            "idx": torch.cat([idx for idx, _ in parts]), "keep": sel.sample_mask.cpu(), "q2": sel.q2.cpu(),
            "token_mask": sel.token_mask.cpu(), "quadrant": sel.quadrant.cpu(), "step": self.state.global_step,
        })


class StepClock(TrainerCallback):
    """Times every optimizer step and evaluates the held-out set after the steps in ``eval_steps``.

    A step's time runs from the end of the previous step (or the start of
    training) to the end of this one: data loading, scoring, triage, forward,
    backward and the optimizer step are in it; the held-out evaluations are not.
    Both the wall-clock time and the process's CPU time are recorded; with one
    torch thread the CPU time is the step's compute, which the other processes
    of a shared machine slow down far less than the wall-clock time.

    Args:
        eval_steps: optimizer steps (1-based) after which to evaluate.
        evaluate: returns the held-out exact match in % of the model as it is.
        tokens: returns the tokens with gradient so far.
    """

    def __init__(self, eval_steps: set[int], evaluate: Callable[[], float], tokens: Callable[[], int]):
        self.eval_steps = eval_steps
        self.evaluate = evaluate
        self.tokens = tokens
        self.step_seconds: list[float] = []
        self.step_cpu_seconds: list[float] = []
        self.curve: list[dict] = []
        self._last = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = (time.perf_counter(), time.process_time())

    def on_step_end(self, args, state, control, **kwargs):
        self.step_seconds.append(time.perf_counter() - self._last[0])
        self.step_cpu_seconds.append(time.process_time() - self._last[1])
        if state.global_step in self.eval_steps:
            self.curve.append({"step": state.global_step, "tokens": self.tokens(), "acc": self.evaluate()})
        self._last = (time.perf_counter(), time.process_time())

"""The quality benchmark's trainers: the plugin's step, recorded, and the comparison arms' steps.

Every arm trains through `transformers.Trainer` with `QTuningTrainerMixin`, the loss
path Axolotl's trainer takes. The datasets yield an ``idx`` column (the item's
index in the SFT set) that the trainers pop before the model sees the batch.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from transformers import Trainer, TrainerCallback

from qtuning_plugin import QTuningTrainerMixin
from qtuning_plugin.callbacks import QTuningPlotCallback
from qtuning_plugin.modeling import final_hidden_states, lm_head_parameters, shifted_targets, unwrap_causal_lm
from qtuning_plugin.ops.backends import resolve_backend
from qtuning_plugin.trainer import kept_token_loss


class Recording:
    """Records, per triage, the dataset indices and what the loss kept; counts the tokens with gradient."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # The per-run training plots of the plugin cost a second of matplotlib per arm; not needed here.
        self.remove_callback(QTuningPlotCallback)
        self.records = []
        self.tokens_with_gradient = 0
        self._idx = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._idx = inputs.pop("idx", None)
        if model.training and not self.qtuning_config.enabled:  # full-data arm: every label
            self.tokens_with_gradient += int((inputs["labels"][:, 1:] != -100).sum())
            self.records.append({"idx": self._idx.cpu(), "keep": torch.ones(len(self._idx), dtype=torch.bool)})
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def _select(self, *args, **kwargs):
        sample_mask, token_mask = super()._select(*args, **kwargs)
        self._record_selection(self._idx, self.qtuning_last_selection)
        return sample_mask, token_mask

    def _triage_step(self, micro_batches):
        self._idx = torch.cat([micro_batch.pop("idx") for micro_batch in micro_batches])
        return super()._triage_step(micro_batches)

    def _select_step(self, *args, **kwargs):
        result = super()._select_step(*args, **kwargs)
        self._record_selection(self._idx, self.qtuning_last_selection)
        return result

    def _record_selection(self, idx, sel) -> None:
        self.tokens_with_gradient += int(sel.token_mask.sum())
        self.records.append({
            "idx": idx.cpu(), "keep": sel.sample_mask.cpu(), "q2": sel.q2.cpu(),
            "token_mask": sel.token_mask.cpu(), "quadrant": sel.quadrant.cpu(), "step": self.state.global_step,
        })


class QTuningTrainer(Recording, QTuningTrainerMixin, Trainer):
    """The plugin as shipped, recorded (either triage scope)."""


class RandomPruneTrainer(Recording, QTuningTrainerMixin, Trainer):
    """Random sample pruning at the same budget: keep round(r * B) random rows, all their tokens.

    Same step as the mixin's two-pass path (forward + backward on the kept
    rows only, mean cross-entropy over their tokens with the same fused op),
    without the scoring forward, which a random choice does not need.

    With ``oracle`` set ("oracle_clean" or "oracle_25") and ``kinds`` (the SFT
    set's ground-truth type per item), the choice uses the ground truth
    instead: fresh items first, then redundant, corrupted last, randomly
    within a type; "oracle_clean" keeps every item that is not corrupted.
    """

    oracle = None
    kinds = None

    def qtuning_loss(self, model, inputs):
        labels = inputs["labels"]
        batch = labels.shape[0]
        if self._qtuning_backend is None:
            self._qtuning_backend = resolve_backend(self.qtuning_config.backend, labels.device)
        gen = getattr(self, "_rand_gen", None)
        if gen is None:
            gen = self._rand_gen = torch.Generator().manual_seed(self.args.seed)
        k = max(1, round(self.qtuning_config.sample_keep_ratio * batch))
        perm = torch.randperm(batch, generator=gen)
        if self.oracle:
            kinds = [self.kinds[int(i)] for i in self._idx]
            rank = {"fresh": 0, "redundant": 1, "corrupted": 2}
            perm = torch.tensor(sorted(perm.tolist(), key=lambda j: rank[kinds[j]]))
            if self.oracle == "oracle_clean":
                k = max(1, sum(kind != "corrupted" for kind in kinds))
        rows = perm[:k].sort().values.to(labels.device)
        sub = {key: value[rows] for key, value in inputs.items() if torch.is_tensor(value) and value.shape[:1] == (batch,)}
        targets = shifted_targets(sub["labels"])
        mask = targets != -100
        weight, bias = lm_head_parameters(unwrap_causal_lm(model))
        hidden = final_hidden_states(model, sub)
        self.tokens_with_gradient += int(mask.sum())
        keep = torch.zeros(batch, dtype=torch.bool)
        keep[rows.cpu()] = True
        self.records.append({"idx": self._idx.cpu(), "keep": keep, "step": self.state.global_step})
        return kept_token_loss(self._qtuning_backend, hidden, weight, bias, targets, mask)


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

"""`QTuningTrainerMixin`: the Q-Tuning engine inside a `transformers.Trainer` (TRL's `SFTTrainer`,
Axolotl's and LLaMA-Factory's trainers included).

    class MyTrainer(QTuningTrainerMixin, Trainer): ...
    trainer = MyTrainer(model=model, args=args, ..., qtuning_config=QTuningConfig())

The step itself is `qtuning_plugin.engine.QTuningEngine`'s; this adapter feeds it and hands
back what the Trainer's loop expects.

``triage_scope: step`` (default): the Trainer fetches all of a step's micro-batches before the
first forward (`Trainer.get_batch_samples`); there the engine scores and triages them as one
mini-batch and plans the training passes. The step's micro-batch slots go back to the loop as
"no pass" slots followed by the passes, so that the last slot, where the loop synchronises
gradients (DDP) or steps the engine (DeepSpeed), is a real pass.

``triage_scope: micro_batch``: each training micro-batch is triaged on its own inside
``compute_loss`` (`QTuningEngine.micro_batch_loss`); the update is then the mean of the
micro-batch losses over gradient accumulation and ranks. `compute_loss` called on a raw
micro-batch (outside the Trainer's loop) takes this path too, whatever the scope.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from qtuning_plugin._logging import LOG
from qtuning_plugin.config import QTuningConfig
from qtuning_plugin.engine import NO_PASS, PASS_KEY, MicroBatch, QTuningEngine, no_pass
from qtuning_plugin.engine.engine import Listener
from qtuning_plugin.hf.rules import check_trainer
from qtuning_plugin.history import QTuningHistory


class QTuningTrainerMixin:
    """Replaces the training loss of a `transformers.Trainer` with Q-Tuning's.

    Put it first among the bases. The settings come from the ``qtuning_config`` keyword (a
    `QTuningConfig` or a dict), else from ``args.qtuning`` (how Axolotl passes them), else the
    defaults. ``qtuning_on_selection`` is called with the `SelectionEvent` of every triage; with
    ``log_decisions`` a `qtuning_plugin.decisions.DecisionLog` writes every triaged sample's line.
    Evaluation, and training with ``enabled=False``, use the wrapped trainer's own loss untouched.
    """

    def __init__(
        self,
        *args: Any,
        qtuning_config: Union[QTuningConfig, dict, None] = None,
        qtuning_on_selection: Optional[Listener] = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        from_args = qtuning_config is None
        if from_args:
            qtuning_config = getattr(self.args, "qtuning", None) or {}
        if isinstance(qtuning_config, QTuningConfig):
            qtuning_config = qtuning_config.model_dump()
        self.qtuning_config = QTuningConfig.model_validate(qtuning_config)
        # Metrics, plot data and checkpointed state (the triage window too), in one place (qtuning_plugin.history).
        self.qtuning_engine = QTuningEngine(self.qtuning_config)
        self.qtuning_history = QTuningHistory(window=self.qtuning_engine.window)
        self.qtuning_engine.listeners.append(self.qtuning_history.record_event)
        if qtuning_on_selection is not None:
            self.qtuning_engine.listeners.append(qtuning_on_selection)
        if self.qtuning_config.enabled:
            check_trainer(self)
            if not from_args:  # Axolotl's plugin has logged it already, before the model loaded
                LOG.info("Q-Tuning is active: %s", self.qtuning_config.describe())
            from qtuning_plugin.hf.callbacks import QTuningDecisionsCallback, QTuningPlotCallback

            self.add_callback(QTuningPlotCallback(self.qtuning_history, self.qtuning_config.plot_every_n_steps))
            if self.qtuning_config.log_decisions:
                from qtuning_plugin.decisions import DecisionLog

                decisions = DecisionLog(
                    self.args.output_dir, self.is_world_process_zero(), self.qtuning_engine.data_parallel
                )
                self.qtuning_engine.listeners.append(decisions.record_event)
                self.add_callback(QTuningDecisionsCallback(decisions))

    def qtuning_prepare_inputs(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> dict[str, Any]:
        """A training micro-batch as the wrapped trainer's ``compute_loss`` would hand it to the model.

        Here unchanged; the Axolotl trainer runs Axolotl's own preparation (its token counts for
        throughput, model-specific input fix-ups).
        """
        return inputs

    def _qtuning_label_smoothing(self) -> float:
        """transformers' ``label_smoothing_factor``, honoured by the fused loss."""
        return self.label_smoother.epsilon if self.label_smoother is not None else 0.0

    # ------------------------------------------------------------- step scope
    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> tuple[list, Any]:
        """`Trainer.get_batch_samples`, then (``triage_scope: step``) the step's triaged passes.

        Returns as many micro-batch slots as the step has micro-batches: "no pass" slots first,
        then the training passes, and no ``num_items_in_batch`` (our loss is normalised already).
        """
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        config = self.qtuning_config
        if not (config.enabled and config.triage_scope == "step" and batch_samples):
            return batch_samples, num_items_in_batch
        model = self.model_wrapped
        model.train()  # as training_step does; the scoring forward runs in the mode the loss is trained in
        batches = [MicroBatch.prepare(self.qtuning_prepare_inputs(model, self._prepare_inputs(b))) for b in batch_samples]
        passes = self.qtuning_engine.step_passes(model, batches, self.state.global_step + 1)
        slots = [no_pass(self.args.device) for _ in range(len(batch_samples) - len(passes))]
        return slots + passes, None

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Tensor:
        if inputs.get(PASS_KEY) is NO_PASS:
            return torch.zeros((), device=self.args.device)
        return super().training_step(model, inputs, num_items_in_batch)

    # ------------------------------------------------------------------ loss
    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch=None):
        engine = self.qtuning_engine
        if PASS_KEY in inputs:
            loss = engine.pass_loss(model, inputs, self._qtuning_label_smoothing())
            # Trainer.training_step divides by the step's micro-batch count unless a
            # compute_loss_func normalises; the pass's loss carries its share already.
            if self.compute_loss_func is None:
                loss = loss * self.current_gradient_accumulation_steps
            return (loss, None) if return_outputs else loss
        if not (self.qtuning_config.enabled and model.training):
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        batch = MicroBatch.prepare(self.qtuning_prepare_inputs(model, inputs, num_items_in_batch))
        loss = engine.micro_batch_loss(model, batch, self.state.global_step + 1, self._qtuning_label_smoothing())
        # Trainer.training_step divides by the accumulation steps only where it expects a loss
        # not normalised by num_items_in_batch (this condition); ours is a mean, so divide elsewhere.
        trainer_divides = (
            not self.model_accepts_loss_kwargs or num_items_in_batch is None
        ) and self.compute_loss_func is None
        if not trainer_divides:
            loss = loss / self.current_gradient_accumulation_steps
        return (loss, None) if return_outputs else loss

    # ------------------------------------------------------- logging, resume
    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self.qtuning_config.enabled and "loss" in logs:
            logs = {**logs, **self.qtuning_history.flush()}
        super().log(logs, *args, **kwargs)

    def _save_checkpoint(self, model: nn.Module, trial: Any, **kwargs: Any) -> None:
        """`Trainer._save_checkpoint`, with ``qtuning_state.json`` written into the checkpoint first.

        transformers writes ``trainer_state.json`` last; a checkpoint that has it, the one a resume
        looks for, then has the Q-Tuning state too, whenever the run was killed.
        """
        if self.qtuning_config.enabled and self.args.should_save:
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR  # at import, transformers would pull in triton

            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            os.makedirs(folder, exist_ok=True)
            self.qtuning_history.save(folder)
        super()._save_checkpoint(model, trial, **kwargs)

    def train(self, resume_from_checkpoint: Union[str, bool, None] = None, *args: Any, **kwargs: Any):
        """`Trainer.train`, with the Q-Tuning history reset, or read back from the checkpoint resumed."""
        self.qtuning_history.reset()
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            from transformers.trainer_utils import get_last_checkpoint

            checkpoint = get_last_checkpoint(self.args.output_dir)
        if isinstance(checkpoint, (str, os.PathLike)) and self.qtuning_config.enabled:
            if not self.qtuning_history.load(str(checkpoint)):
                LOG.warning("qtuning: %s has no qtuning_state.json; metrics and plots start afresh", checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

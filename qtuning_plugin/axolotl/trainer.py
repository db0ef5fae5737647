"""Axolotl's own trainer with the Q-Tuning loss mixed in.

`AxolotlTrainer.compute_loss` does work of its own before it hands the micro-batch on to
`transformers.Trainer.compute_loss`: it counts the tokens behind its
``tokens/train_per_sec_per_gpu`` metric and fixes up the inputs of some models. Q-Tuning
replaces the loss but keeps that work: `_TrainerLossInputs`, placed between `AxolotlTrainer`
and `Trainer` in the class hierarchy, hands the prepared inputs back instead of computing
a loss while `AxolotlQTuningTrainer.qtuning_prepare_inputs` runs Axolotl's `compute_loss`.
"""

from __future__ import annotations

from typing import Any

from axolotl.core.trainers.base import AxolotlTrainer
from transformers import Trainer

from qtuning_plugin.hf.trainer import QTuningTrainerMixin


class _PreparedInputs(dict):
    """The inputs `Trainer.compute_loss` received, returned in place of a loss."""


class _TrainerLossInputs(Trainer):
    """Just above `Trainer` in the hierarchy: while ``_qtuning_preparing`` is set, its
    ``compute_loss`` returns the inputs it is given instead of a loss."""

    _qtuning_preparing = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._qtuning_preparing:
            return _PreparedInputs(inputs)
        return super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )


class AxolotlQTuningTrainer(QTuningTrainerMixin, AxolotlTrainer, _TrainerLossInputs):
    """`AxolotlTrainer` whose training loss is Q-Tuning's; evaluation is untouched."""

    def qtuning_prepare_inputs(self, model, inputs: dict[str, Any], num_items_in_batch=None) -> dict[str, Any]:
        """The micro-batch after `AxolotlTrainer.compute_loss`'s own work, without its loss."""
        self._qtuning_preparing = True
        try:
            prepared = AxolotlTrainer.compute_loss(self, model, inputs, num_items_in_batch=num_items_in_batch)
        finally:
            self._qtuning_preparing = False
        if not isinstance(prepared, _PreparedInputs):
            raise RuntimeError(
                "qtuning: AxolotlTrainer.compute_loss computed a loss of its own instead of handing the "
                "inputs on to Trainer.compute_loss; Q-Tuning cannot honour it"
            )
        return dict(prepared)

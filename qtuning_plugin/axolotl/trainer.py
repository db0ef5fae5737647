"""Axolotl's own trainer with the Q-Tuning loss mixed in."""

from axolotl.core.trainers.base import AxolotlTrainer

from qtuning_plugin.trainer import QTuningTrainerMixin


class AxolotlQTuningTrainer(QTuningTrainerMixin, AxolotlTrainer):
    """`AxolotlTrainer` whose training loss is Q-Tuning's; evaluation is untouched."""

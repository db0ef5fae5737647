"""`QTuningPlugin`: registers the `qtuning:` section and swaps in the Q-Tuning trainer."""

from __future__ import annotations

from axolotl.integrations.base import BasePlugin

from qtuning_plugin._logging import LOG
from qtuning_plugin.axolotl.args import qtuning_section
from qtuning_plugin.config import QTuningConfig


class QTuningPlugin(BasePlugin):
    """Q-Tuning for Axolotl. Does nothing unless a `qtuning:` section enables it.

    ```yaml
    plugins:
      - qtuning_plugin.QTuningPlugin
    qtuning:
      sample_keep_ratio: 0.25
      token_keep_ratio: 0.5
    ```
    """

    def get_input_args(self) -> str:
        return "qtuning_plugin.axolotl.args.QTuningArgs"

    def get_training_args_mixin(self) -> str:
        return "qtuning_plugin.axolotl.args.QTuningTrainingArgsMixin"

    def pre_model_load(self, cfg) -> None:
        section = qtuning_section(cfg)
        if section is None:
            LOG.info("Q-Tuning plugin loaded but not enabled (no `qtuning:` section, or `enabled: false`)")
        else:
            LOG.info("Q-Tuning is active: %s", QTuningConfig.model_validate(section).describe())

    def get_training_args(self, cfg) -> dict:
        section = qtuning_section(cfg)
        return {"qtuning": section} if section is not None else {}

    def get_trainer_cls(self, cfg):
        if qtuning_section(cfg) is None:
            return None
        from qtuning_plugin.axolotl.trainer import AxolotlQTuningTrainer

        return AxolotlQTuningTrainer

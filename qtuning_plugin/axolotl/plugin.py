"""`QTuningPlugin`: registers the `qtuning:` section and swaps in the Q-Tuning trainer."""

from __future__ import annotations

from typing import Optional

from axolotl.integrations.base import BasePlugin

from qtuning_plugin._logging import LOG, log_through_axolotl
from qtuning_plugin.axolotl.args import qtuning_section
from qtuning_plugin.config import QTuningConfig


class QTuningPlugin(BasePlugin):
    """Q-Tuning for Axolotl. Does nothing unless a `qtuning:` section enables it.

    Axolotl >= 0.21 loads it through the `axolotl.plugins` entry point; 0.19 needs the
    `plugins:` line.

    ```yaml
    plugins:
      - qtuning_plugin.QTuningPlugin
    qtuning:
      sample_keep_ratio: 0.25
      token_keep_ratio: 0.5
    ```
    """

    def __init__(self):
        super().__init__()
        log_through_axolotl()  # Axolotl shows INFO records of `axolotl.*` loggers only

    def is_duplicate(self) -> bool:
        """Whether Axolotl's plugin manager holds another `QTuningPlugin` registered before this one.

        Axolotl keys plugins by name, and one class can be named two ways
        (`qtuning_plugin.QTuningPlugin`, `qtuning_plugin.axolotl.plugin.QTuningPlugin`;
        Axolotl >= 0.21 also loads the entry point without any `plugins:` line): each name
        gets its own instance. Only the first contributes the args model, the training-args
        mixin, the trainer and the hooks; a second `QTuningArgs` base would make Axolotl's
        schema merge fail with "duplicate base class".
        """
        from axolotl.integrations.base import PluginManager

        registered = [plugin for plugin in PluginManager().plugins.values() if isinstance(plugin, QTuningPlugin)]
        return any(plugin is self for plugin in registered[1:])

    def get_input_args(self) -> Optional[str]:
        return None if self.is_duplicate() else "qtuning_plugin.axolotl.args.QTuningArgs"

    def get_training_args_mixin(self) -> Optional[str]:
        return None if self.is_duplicate() else "qtuning_plugin.axolotl.args.QTuningTrainingArgsMixin"

    def pre_model_load(self, cfg) -> None:
        if self.is_duplicate():
            LOG.debug("Q-Tuning plugin registered under a second name: this instance stays inactive")
            return
        section = qtuning_section(cfg)
        if section is None:
            LOG.info("Q-Tuning plugin loaded but not enabled (no `qtuning:` section, or `enabled: false`)")
        else:
            LOG.info("Q-Tuning is active: %s", QTuningConfig.model_validate(section).describe())

    def get_training_args(self, cfg) -> dict:
        section = None if self.is_duplicate() else qtuning_section(cfg)
        return {"qtuning": section} if section is not None else {}

    def get_trainer_cls(self, cfg):
        if self.is_duplicate() or qtuning_section(cfg) is None:
            return None
        from qtuning_plugin.axolotl.trainer import AxolotlQTuningTrainer

        return AxolotlQTuningTrainer

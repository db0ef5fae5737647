"""The package's logger, ``qtuning_plugin``.

Axolotl shows records below WARNING only from loggers named ``axolotl.*``, so the Axolotl plugin
calls `log_through_axolotl` when it loads: from then on the records go to
``axolotl.integrations.qtuning``.
"""

import logging

AXOLOTL_LOGGER = "axolotl.integrations.qtuning"

LOG = logging.LoggerAdapter(logging.getLogger("qtuning_plugin"))


def log_through_axolotl() -> None:
    LOG.logger = logging.getLogger(AXOLOTL_LOGGER)

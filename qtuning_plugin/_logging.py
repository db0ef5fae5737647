"""The package's logger, ``qtuning_plugin``.

Axolotl shows records below WARNING only from loggers named ``axolotl.*``, and LLaMA-Factory
prints only those of ``llamafactory.*`` (its own handler and format, also copied into
LlamaBoard's running log). So each host adapter routes the records through a logger of its
host when it loads: the Axolotl plugin calls `log_through_axolotl` (``axolotl.integrations.qtuning``),
`qtuning-llamafactory` calls `log_through_llamafactory` (``llamafactory.qtuning``).
"""

import logging

AXOLOTL_LOGGER = "axolotl.integrations.qtuning"
LLAMAFACTORY_LOGGER = "llamafactory.qtuning"

LOG = logging.LoggerAdapter(logging.getLogger("qtuning_plugin"))


def log_through_axolotl() -> None:
    LOG.logger = logging.getLogger(AXOLOTL_LOGGER)


def log_through_llamafactory() -> None:
    from llamafactory.extras.logging import get_logger  # configures LLaMA-Factory's handler first

    LOG.logger = get_logger(LLAMAFACTORY_LOGGER)

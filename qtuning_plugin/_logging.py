"""The package's logger. Axolotl shows records below WARNING only from loggers named `axolotl.*`."""

import logging

LOG = logging.getLogger("axolotl.integrations.qtuning")

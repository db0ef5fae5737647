"""``python -m qtuning_plugin.llamafactory train cfg.yaml [key=value ...]``, as ``qtuning-llamafactory``."""

from qtuning_plugin.llamafactory.cli import main

main()

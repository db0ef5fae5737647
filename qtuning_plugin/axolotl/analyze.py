"""`axolotl qtuning analyze CONFIG`: load what `axolotl train CONFIG` would train on, then score and
triage it with `qtuning_plugin.analyze` (`load` serves `axolotl qtuning select` too).

Model, tokenizer and training dataset come from Axolotl's own `load_cfg`, `load_datasets`,
`load_tokenizer` and `ModelLoader` (adapters, dtype, chat template, `val_set_size` split and
filters included).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

from qtuning_plugin.analyze import Analysis, AnalysisError, Scores, analyze_scores, score_dataset, write_outputs
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


@dataclass(frozen=True)
class Loaded:
    """What `axolotl train CONFIG` would train: the config's sections, its data, tokenizer and model."""

    config: QTuningConfig
    cfg: Any  # Axolotl's validated config (DictDefault)
    train: Any  # the training set (a datasets.Dataset), cut to ``max_samples``
    eval: Any  # the held-out set, or None
    tokenizer: Any
    model: Any

    @property
    def micro_batch_size(self) -> int:
        return int(self.cfg.micro_batch_size or 1)

    def score(self, *, progress: bool = True, token_nll: bool = False) -> Scores:
        """`score_dataset` of the training set, a micro-batch per forward."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        return score_dataset(
            self.model,
            self.train,
            self.config,
            batch_size=self.micro_batch_size,
            pad_token_id=pad,
            progress=progress,
            token_nll=token_nll,
        )


def load(config_path: str, *, max_samples: Optional[int] = None) -> Loaded:
    """Load through Axolotl: config, training (and held-out) set, tokenizer, model.

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
        datasets = load_datasets(cfg=cfg)
    except ValueError as error:  # e.g. Axolotl dropped every sample for having no trainable token
        raise AnalysisError(f"could not load the training dataset: {_one_line(error)}") from None
    dataset = datasets.train_dataset
    if dataset is None or len(dataset) == 0:
        raise AnalysisError("the training dataset is empty")
    if max_samples is not None and max_samples < len(dataset):
        dataset = dataset.select(range(max_samples))
    tokenizer = load_tokenizer(cfg)
    model, _ = ModelLoader(cfg, tokenizer).load()
    return Loaded(config, cfg, dataset, datasets.eval_dataset, tokenizer, model)


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
    loaded = load(config_path, max_samples=max_samples)
    cfg, config = loaded.cfg, loaded.config
    scores = loaded.score(progress=progress)
    mini_batch = config.triage_batch_size(
        loaded.micro_batch_size, int(cfg.gradient_accumulation_steps or 1), int(cfg.world_size or 1)
    )
    analysis = analyze_scores(scores, config, mini_batch)
    paths = write_outputs(analysis, out_dir or os.path.join(cfg.output_dir or ".", "qtuning-analysis"))
    return analysis, paths

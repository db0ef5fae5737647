"""`axolotl qtuning select CONFIG --out DIR`: load what `axolotl train CONFIG` would train on
(`qtuning_plugin.axolotl.analyze.load`), select from it once with `qtuning_plugin.dataset_selection`,
and write the kept rows and the per-row report.

The report names each row's dataset of origin and its index there: each dataset of the config is
tokenised again on its own, as Axolotl does before merging, shuffling and filtering them, and a
training row is matched to its origin by the key of its tokens (`sample_key`).
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

from qtuning_plugin._logging import LOG
from qtuning_plugin.analyze import AnalysisError
from qtuning_plugin.axolotl.analyze import load
from qtuning_plugin.dataset_selection import (
    DatasetSelection,
    check_out_dir,
    check_window,
    match_origins,
    select_scored,
    write_selection,
)


def check_has_datasets(config_path: str) -> None:
    """Refuse a config without ``datasets:`` (the rows that select scores)."""
    import yaml

    with open(config_path, encoding="utf-8") as handle:
        raw = yaml.safe_load(handle)
    if not isinstance(raw, dict) or not raw.get("datasets"):
        raise AnalysisError(
            f"{config_path} has no `datasets:`: select scores and selects the training rows of the config's "
            "`datasets:` (a `pretraining_dataset:` is not supported)"
        )


def _describe(dataset_config: Any) -> str:
    name = str(dataset_config.path)
    if dataset_config.name:
        name += f" ({dataset_config.name})"
    if dataset_config.shards:
        name += f" shard {dataset_config.get('shards_idx', 0)} of {dataset_config.shards}"
    return name


def _input_ids(dataset: Any) -> Iterator[list[int]]:
    for batch in dataset.iter(batch_size=1024):
        yield from batch["input_ids"]


def dataset_sources(cfg: Any, tokenizer: Any, train: Any) -> list[tuple[str, Optional[int]]]:
    """Each training row's dataset of origin (its `path`) and index there (`match_origins`)."""
    try:
        from axolotl.utils.data.sft import _load_and_process_single_dataset
        from axolotl.utils.data.shared import datasets_with_name_generator

        datasets = [
            (
                _describe(dataset_config),
                _load_and_process_single_dataset(
                    dataset_config=dataset_config, cfg=cfg, tokenizer=tokenizer, split="train", seed=cfg.seed
                )[0],
            )
            for dataset_config in datasets_with_name_generator(cfg.datasets)
        ]
    except (ImportError, TypeError) as error:  # an Axolotl whose loading functions differ
        LOG.warning("qtuning select: the report names no dataset of origin (%s)", error)
        return [("", None)] * len(train)
    return match_origins(((name, _input_ids(rows)) for name, rows in datasets), _input_ids(train))


def run(
    config_path: str,
    *,
    out_dir: str,
    window: Optional[int] = None,
    overwrite: bool = False,
    max_samples: Optional[int] = None,
    progress: bool = True,
) -> tuple[DatasetSelection, dict[str, str], bool]:
    """The whole command: check, load through Axolotl, score, select, write.

    Returns:
        The `DatasetSelection`, the paths written (``dataset``, ``report.csv``), and whether the
        dataset holds the config's held-out rows as its ``validation`` split.

    Raises:
        AnalysisError: a config or data problem, in one line.
        FileExistsError: ``out_dir`` exists and is not empty, without ``overwrite``.
    """
    check_window(window)
    check_has_datasets(config_path)
    check_out_dir(out_dir, overwrite)
    loaded = load(config_path, max_samples=max_samples)
    sources = dataset_sources(loaded.cfg, loaded.tokenizer, loaded.train)
    scores = loaded.score(progress=progress, token_nll=True)
    selection = select_scored(loaded.train, scores, loaded.config, window=window, sources=sources)
    paths = write_selection(selection, out_dir, eval_rows=loaded.eval, overwrite=overwrite)
    return selection, paths, loaded.eval is not None and len(loaded.eval) > 0

"""A whole-dataset selection (`qtuning_plugin.dataset_selection`) on rows that LLaMA-Factory tokenised,
loaded back by LLaMA-Factory 0.9.5 through ``tokenized_path`` (in this process, the tiny model): its
own `get_dataset` and SFT collator, as ``llamafactory-cli train`` calls them before training."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from lf_run import example_config

ROWS = 40


def load_as_llamafactory(config: Path, tokenized_path: Path):
    """LLaMA-Factory's SFT data path for ``config`` with ``tokenized_path``: its template, tokenizer,
    dataset module (tokenised and saved there if the folder is missing, loaded from it otherwise)
    and the collator of its `run_sft`."""
    from llamafactory.data import SFTDataCollatorWith4DAttentionMask, get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    args = yaml.safe_load(config.read_text(encoding="utf-8"))
    args.pop("qtuning", None)
    args["tokenized_path"] = str(tokenized_path)
    model_args, data_args, training_args, _, _ = get_train_args(args)
    tokenizer_module = load_tokenizer(model_args)
    template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
    module = get_dataset(template, model_args, data_args, training_args, stage="sft", **tokenizer_module)
    collator = SFTDataCollatorWith4DAttentionMask(
        template=template, pad_to_multiple_of=8, label_pad_token_id=-100, compute_dtype=torch.float32, **tokenizer_module
    )
    return module, collator


def test_llamafactory_loads_the_written_selection_as_its_tokenized_dataset(tiny_model, tmp_path):
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM

    from qtuning_plugin import QTuningConfig, select_dataset, write_selection

    config = example_config(tmp_path, tiny_model, steps=1)
    load_as_llamafactory(config, tmp_path / "tokenized")  # LLaMA-Factory tokenises the dataset and saves it
    rows = load_from_disk(str(tmp_path / "tokenized"))["train"].select(range(ROWS))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    selection = select_dataset(
        model, rows, QTuningConfig(sample_keep_ratio=0.5, token_keep_ratio=0.5), batch_size=8, progress=False
    )
    paths = write_selection(selection, str(tmp_path / "selection"))
    pruned = [row for row in selection.report if row.kept and row.tokens_kept < row.trainable_tokens]
    assert pruned and len(selection.train_rows) >= ROWS // 2

    module, collator = load_as_llamafactory(config, Path(paths["dataset"]))
    train = module["train_dataset"]
    assert "eval_dataset" not in module
    assert [{key: row[key] for key in ("input_ids", "attention_mask", "labels")} for row in train] == selection.train_rows
    batch = collator([dict(train[i]) for i in range(4)])
    for b, row in enumerate(selection.train_rows[:4]):
        n = len(row["labels"])
        assert batch["labels"][b, :n].tolist() == row["labels"] and (batch["labels"][b, n:] == -100).all()
        assert batch["input_ids"][b, :n].tolist() == row["input_ids"]

"""What the step benchmarks share: one SFT micro-batch, and the trainer whose loss they time."""

from __future__ import annotations

import tempfile

import torch


def sft_batch(vocab_size: int, batch: int, seq: int, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """``batch`` rows of ``seq`` random tokens: the first quarter of each row is prompt (label -100), no padding."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, vocab_size, (batch, seq), generator=generator)
    labels = input_ids.clone()
    labels[:, : seq // 4] = -100
    inputs = {"input_ids": input_ids, "labels": labels, "attention_mask": torch.ones_like(input_ids)}
    return {key: value.to(device) for key, value in inputs.items()}


def qtuning_trainer(model, config, device: str | torch.device = "cpu"):
    """A transformers ``Trainer`` with ``QTuningTrainerMixin`` (the loss path Axolotl's trainer takes)."""
    from transformers import Trainer, TrainingArguments

    from qtuning_plugin import QTuningTrainerMixin

    class QTuningTrainer(QTuningTrainerMixin, Trainer):
        pass

    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="qtuning-bench-"),
        report_to=[],
        use_cpu=torch.device(device).type == "cpu",
        save_strategy="no",
    )
    return QTuningTrainer(model=model, args=args, qtuning_config=config)

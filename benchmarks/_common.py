"""What the step benchmarks share: the random Llama they train, one SFT micro-batch, and the
trainer whose loss they time."""

from __future__ import annotations

import contextlib
import tempfile
from typing import Iterator, Optional

import torch


def build_llama(
    config: dict,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: Optional[torch.dtype] = None,
    lora_r: Optional[int] = None,
):
    """A randomly initialised ``LlamaForCausalLM`` of ``LlamaConfig(**config)``.

    SDPA attention and an untied LM head unless ``config`` says otherwise. The weights are drawn
    after ``torch.manual_seed(seed)``, on ``device`` (seconds, not minutes, for a large model on a
    GPU; ``"meta"`` for the shapes only), then cast to ``dtype`` if given. With ``lora_r`` the model
    is wrapped in LoRA r ``lora_r``, alpha ``2 * lora_r``, no dropout, on every linear layer, and
    put in training mode.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    llama_config = LlamaConfig(**{"tie_word_embeddings": False, "attn_implementation": "sdpa", **config})
    with torch.device(device):
        model = LlamaForCausalLM(llama_config)
    if dtype is not None:
        model = model.to(dtype=dtype)
    if lora_r is not None:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0, target_modules="all-linear")
        model = get_peft_model(model, lora)
        model.train()
    return model


def sft_batch(vocab_size: int, batch: int, seq: int, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """``batch`` rows of ``seq`` random tokens: the first quarter of each row is prompt (label -100), no padding."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, vocab_size, (batch, seq), generator=generator)
    labels = input_ids.clone()
    labels[:, : seq // 4] = -100
    inputs = {"input_ids": input_ids, "labels": labels, "attention_mask": torch.ones_like(input_ids)}
    return {key: value.to(device) for key, value in inputs.items()}


@contextlib.contextmanager
def qtuning_trainer(model, config, device: str | torch.device = "cpu") -> Iterator:
    """A transformers ``Trainer`` with ``QTuningTrainerMixin`` (the loss path Axolotl's trainer takes).

    Its output folder (nothing is saved there) is a temporary directory, removed when the
    ``with`` block ends.
    """
    from transformers import Trainer, TrainingArguments

    from qtuning_plugin import QTuningTrainerMixin

    class QTuningTrainer(QTuningTrainerMixin, Trainer):
        pass

    with tempfile.TemporaryDirectory(prefix="qtuning-bench-") as output_dir:
        args = TrainingArguments(
            output_dir=output_dir,
            report_to=[],
            use_cpu=torch.device(device).type == "cpu",
            save_strategy="no",
        )
        yield QTuningTrainer(model=model, args=args, qtuning_config=config)

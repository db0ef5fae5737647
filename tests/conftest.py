"""Shared fixtures: a tiny Llama with LoRA, built in-process (no hub, no files); the ``cuda`` marker.

Tests marked ``cuda`` run on a CUDA device and skip without one. With ``QTUNING_REQUIRE_CUDA=1``
in the environment (the GPU check, `benchmarks/gpu_check.py`) such a skip is a failure instead:
on the GPU machine every CUDA test must really run.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from torch.utils.data import Dataset

VOCAB = 101

# The training paths: one triage per optimizer step, or per micro-batch with either scoring.
SCORINGS = {
    "step": {"triage_scope": "step"},
    "two_pass": {"triage_scope": "micro_batch", "scoring": "two_pass"},
    "single_pass": {"triage_scope": "micro_batch", "scoring": "single_pass"},
}
REQUIRE_CUDA_ENV = "QTUNING_REQUIRE_CUDA"
CUDA = pytest.param(
    "cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")], id="cuda"
)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", f"cuda: runs on a CUDA device; with {REQUIRE_CUDA_ENV}=1 a skip of it is a failure"
    )
    config.addinivalue_line(
        "markers", "cutedsl: needs liger-kernel's optional cutedsl extra (Liger's sm90 CuTe DSL kernels)"
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if (
        os.environ.get(REQUIRE_CUDA_ENV) == "1"
        and report.skipped
        and not hasattr(report, "wasxfail")
        and item.get_closest_marker("cuda") is not None
    ):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"{REQUIRE_CUDA_ENV}=1: this CUDA test must run here, but it skipped: {reason}"


def tiny_llama(seed: int = 0, lora: bool = True, modules_to_save: tuple[str, ...] = ()):
    """A 2-layer Llama (hidden 32, vocab 101); with LoRA r 4 on every linear layer, dropout 0,
    and full trainable copies of ``modules_to_save`` (PEFT's ``ModulesToSaveWrapper``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config)
    if not lora:
        return model
    from peft import LoraConfig, get_peft_model

    lora_config = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules="all-linear",
        init_lora_weights=False,
        modules_to_save=list(modules_to_save) or None,
    )
    return get_peft_model(model, lora_config)


def random_batch(batch: int = 8, length: int = 16, seed: int = 0, pad_right: bool = True):
    """Right-padded SFT rows: a prompt (label -100), a response, then padding."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
    labels = input_ids.clone()
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    for b in range(batch):
        prompt = int(torch.randint(2, 5, (1,), generator=generator))
        used = length - int(torch.randint(0, 5, (1,), generator=generator)) if pad_right else length
        labels[b, :prompt] = -100
        labels[b, used:] = -100
        input_ids[b, used:] = 0
        attention_mask[b, used:] = 0
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


class Rows(Dataset):
    """The rows of a `random_batch` as a dataset, one dict of tensors per row."""

    def __init__(self, batch):
        self.batch = batch

    def __len__(self):
        return self.batch["input_ids"].shape[0]

    def __getitem__(self, index):
        return {key: value[index] for key, value in self.batch.items()}


@pytest.fixture
def model():
    return tiny_llama()


class Selections(list):
    """Every `SelectionEvent` of a trainer from now on, through the engine's public listeners
    (what ``qtuning_on_selection`` registers): ``events = Selections.of(trainer)``."""

    @classmethod
    def of(cls, trainer) -> "Selections":
        events = cls()
        trainer.qtuning_engine.listeners.append(events.append)
        return events

    @property
    def last(self):
        """The core `Selection` of the latest triage."""
        return self[-1].selection

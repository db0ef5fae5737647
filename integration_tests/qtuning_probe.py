"""A test-only Axolotl plugin that records what happened inside `axolotl train`.

The integration tests add ``qtuning_probe.ProbePlugin`` to a config's
``plugins:`` (with this folder on ``PYTHONPATH``). It writes
``<output_dir>/qtuning_probe.json`` with:

* ``trainer_cls``: the class of the trainer Axolotl built;
* ``linear4bit``: the bitsandbytes ``Linear4bit`` modules of the loaded model
  (name, packed weight dtype and shape, quant type), the proof that QLoRA
  really quantised the base layers;
* ``lora``: for every LoRA weight (none under ZeRO-3), its norm after loading
  and the norm of its change over training (LoRA B starts at zero, so a
  non-zero B changed);
* ``batch``: the keys, shapes and one right-padded row of the first collated
  training batch (position_ids included), for the report;
* ``selections``: one entry per triage during training (the trainer's
  `QTuningEngine` listeners: one per optimizer step, or per micro-batch under
  ``triage_scope: micro_batch``): every sample's PPL, Ent, trainable-token
  count L, kept-token count and Q2/kept flags, so that a test can redo the
  algorithm's triage and token budget independently; where a triage spans several
  micro-batches (one process), also ``alone``: the same triage with each micro-batch scored
  in a forward of its own (`reference.scored_alone`).

In a multi-process run each rank writes ``qtuning_probe.rank<RANK>.json``.

``qtuning_probe.SeedPlugin`` seeds torch with the config's ``seed`` before the model loads, so
that the LoRA weights start the same in every run: torch >= 2.13 seeds its generator at random
when it starts, and Axolotl seeds only the trainer, which it builds after the adapters.

``qtuning_probe.KillPlugin`` kills the process with SIGKILL at a chosen moment, for the
fault-injection test (``test_axolotl_kill_resume.py``): with ``QTUNING_KILL=EVENT:N[:DELAY_MS]``
in the environment, at the ``N``-th EVENT of this process, counted from its start:

* ``scoring``: a forward of the first decoder layer without gradient in training mode (the
  Q-Tuning scoring pass);
* ``training``: a forward of that layer with gradient (a training pass);
* ``saving``: ``DELAY_MS`` after the logging of an optimizer step that saves a checkpoint (its
  plots written), where the checkpoint save starts: somewhere in the save, or just after it.

``qtuning_probe.CpuRanksPlugin`` sets ``use_cpu`` in the training arguments, which
Axolotl's config has no key for: DeepSpeed on several CPU processes needs it (see
``test_axolotl_deepspeed.py``).
"""

from __future__ import annotations

import json
import os
import signal
import threading
from typing import Any

import torch
from axolotl.integrations.base import BasePlugin
from transformers import TrainerCallback

PROBE_FILE = "qtuning_probe.json"


def _lora_weights(model) -> dict[str, torch.Tensor]:
    """Float copies of the LoRA weights; none under ZeRO-3, whose parameters are empty partitions here."""
    return {
        name: param.detach().float().clone()
        for name, param in model.named_parameters()
        if "lora_" in name and not hasattr(param, "ds_id")
    }


class ProbePlugin(BasePlugin):
    def __init__(self) -> None:
        super().__init__()
        self.record: dict[str, Any] = {}
        self.lora_before: dict[str, torch.Tensor] = {}

    def _write(self, cfg) -> None:
        os.makedirs(cfg.output_dir, exist_ok=True)
        name = PROBE_FILE
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            name = name.replace(".json", f".rank{os.environ['RANK']}.json")
        with open(os.path.join(cfg.output_dir, name), "w", encoding="utf-8") as handle:
            json.dump(self.record, handle, indent=1, default=str)

    def post_model_load(self, cfg, model) -> None:
        linear4bit = []
        try:
            import bitsandbytes as bnb

            for name, module in model.named_modules():
                if isinstance(module, bnb.nn.Linear4bit):
                    weight = module.weight
                    quant_state = getattr(weight, "quant_state", None)
                    linear4bit.append(
                        {
                            "name": name,
                            "weight_cls": type(weight).__name__,
                            "weight_dtype": str(weight.dtype),
                            "weight_shape": list(weight.shape),
                            "quant_type": getattr(quant_state, "quant_type", None),
                            "logical_shape": list(getattr(quant_state, "shape", []) or []),
                        }
                    )
        except ImportError:
            pass
        self.record["linear4bit"] = linear4bit
        self.record["model_cls"] = type(model).__name__
        self.lora_before = _lora_weights(model)
        self._write(cfg)

    def post_trainer_create(self, cfg, trainer) -> None:
        self.record["trainer_cls"] = f"{type(trainer).__module__}.{type(trainer).__name__}"
        engine = getattr(trainer, "qtuning_engine", None)
        if engine is not None:
            from reference import scored_alone, selection_record  # tests/, on PYTHONPATH (axolotl_run.py)

            selections = self.record.setdefault("selections", [])

            def record(event) -> None:
                if event.selection is None:
                    return
                selections.append(selection_record(event))
                if len(event.micro_batches) > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
                    selections[-1]["alone"] = scored_alone(engine, trainer.model_wrapped, event)

            engine.listeners.append(record)
        batch = next(iter(trainer.get_train_dataloader()))
        info: dict[str, Any] = {
            "keys": sorted(batch.keys()),
            "shapes": {key: list(value.shape) for key, value in batch.items() if torch.is_tensor(value)},
        }
        mask = batch.get("attention_mask")
        if mask is not None:
            lengths = mask.sum(dim=1)
            row = int(lengths.argmin())
            info["row"] = row
            info["row_length"] = int(lengths[row])
            for key in ("input_ids", "labels", "attention_mask", "position_ids"):
                if key in batch and torch.is_tensor(batch[key]):
                    info[f"row_{key}"] = batch[key][row].tolist()
        self.record["batch"] = info
        self._write(cfg)

    def post_train(self, cfg, model) -> None:
        after = _lora_weights(model)
        self.record["lora"] = {
            name: {
                "norm_before": float(self.lora_before[name].norm()) if name in self.lora_before else None,
                "norm_after": float(value.norm()),
                "change": float((value - self.lora_before[name]).norm()) if name in self.lora_before else None,
            }
            for name, value in after.items()
        }
        self._write(cfg)


class SeedPlugin(BasePlugin):
    def pre_model_load(self, cfg) -> None:
        torch.manual_seed(cfg.seed)


class CpuRanksPlugin(BasePlugin):
    """`TrainingArguments(use_cpu=True)`: `torchrun` CPU processes then form a gloo process group.

    Without it, transformers' `TrainingArguments` sets up DeepSpeed on a machine without GPUs as a
    single process (accelerate's `PartialState` finds no distributed backend), and
    ``ACCELERATE_USE_CPU=1`` would turn DeepSpeed off altogether (accelerate then wraps the
    model in DDP).

    On Axolotl >= 0.21 it also answers Axolotl's CUDA peer-to-peer probe (``prepare_optim_env``
    asks `torch.cuda.can_device_access_peer` whenever ``WORLD_SIZE > 1``), which a CUDA build of
    torch on a machine without a GPU answers with "Found no NVIDIA driver": no GPU, no P2P.
    """

    def register(self, cfg) -> None:
        import torch

        try:
            import axolotl.utils.trainer as axolotl_trainer
        except ImportError:
            return
        if hasattr(axolotl_trainer, "check_cuda_p2p_ib_support") and not torch.cuda.is_available():
            axolotl_trainer.check_cuda_p2p_ib_support = lambda: False

    def get_training_args(self, cfg) -> dict:
        return {"use_cpu": True}


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class _KillInSave(TrainerCallback):
    """Added after the Q-Tuning trainer's own callbacks: its ``on_log`` runs after theirs (the plots),
    just before `Trainer._save_checkpoint`."""

    def __init__(self, nth: int, delay_s: float):
        self.nth, self.delay_s, self.seen = nth, delay_s, 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if control.should_save and logs and "loss" in logs:
            self.seen += 1
            if self.seen == self.nth:
                threading.Timer(self.delay_s, _kill).start()


class KillPlugin(BasePlugin):
    def post_trainer_create(self, cfg, trainer) -> None:
        spec = os.environ.get("QTUNING_KILL")
        if not spec:
            return
        event, nth, *delay_ms = spec.split(":")
        nth = int(nth)
        if event == "saving":
            trainer.add_callback(_KillInSave(nth, float(delay_ms[0]) / 1000 if delay_ms else 0.0))
            return
        if event not in ("scoring", "training"):
            raise ValueError(f"QTUNING_KILL: unknown event {event!r}")
        layer = next(module for name, module in trainer.model.named_modules() if name.endswith("layers.0"))
        seen = [0]

        def count_forward(module, args):
            if module.training and torch.is_grad_enabled() == (event == "training"):
                seen[0] += 1
                if seen[0] == nth:
                    _kill()

        layer.register_forward_pre_hook(count_forward)

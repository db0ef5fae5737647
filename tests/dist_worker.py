"""One rank of the data-parallel tests (`tests/test_distributed.py`), launched by torchrun.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_worker.py OUT_DIR [fsdp] [trainer]

Runs every scenario on a gloo process group, CPU only, and saves what each
rank saw to ``OUT_DIR/rank{R}.pt``; the test compares it with a single
process's results on the concatenated batch. Scenarios:

* ``select``: `select` with `gather_samples` on unequal per-rank batches.
* ``ddp/<case>``: one Q-Tuning two-pass training step of the tiny LoRA Llama
  wrapped in `DistributedDataParallel`, each rank on its half of the batch:
  selections, loss and LoRA gradients after backward.
* ``fsdp/<name>`` (with the ``fsdp`` argument): the same step under FSDP2
  (`fully_shard`) and FSDP1 (`FullyShardedDataParallel`), LoRA and full
  fine-tuning: full gradients after backward.
* ``trainer/<scope>/<run>`` (with the ``trainer`` argument): `Trainer.train` with
  `QTuningTrainerMixin` for a few optimizer steps under DDP, DeepSpeed ZeRO-2 and
  ZeRO-3 (`TRAINER_RUNS`): the dataset rows each rank fetched, every `select`
  call, the trainable parameters after every optimizer step, and on rank 0 the lines of
  ``qtuning_decisions.jsonl``.
"""

from __future__ import annotations

import contextlib
import os
import sys
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import Rows, random_batch, tiny_llama  # noqa: E402

# Shared with the test: the data of every scenario.
SELECT_CASES = [  # (global batch size, rows on rank 0, sample_keep_ratio, seed)
    (12, 7, 0.25, 0),
    (12, 5, 0.5, 1),
    (9, 4, 0.125, 2),
]
DDP_BATCH, DDP_RANK_ROWS = 8, 4
DDP_CASES = {
    # name: (seed of the batch, qtuning settings, rank 1 has no trainable token)
    "basic": (21, {"sample_keep_ratio": 0.5, "token_keep_ratio": 0.5}, False),
    # rank 1's rows are all triaged out (checked by the test): it trains on zero samples
    "rank1_triaged_out": (3, {"sample_keep_ratio": 0.25, "token_keep_ratio": 0.5}, False),
    "rank1_without_targets": (22, {"sample_keep_ratio": 0.5, "token_keep_ratio": 0.7}, True),
}


def select_batch(batch: int, seed: int):
    """Random per-token statistics of a mini-batch, with ragged trainable spans."""
    generator = torch.Generator().manual_seed(seed)
    length = 10
    nll = torch.rand(batch, length, generator=generator, dtype=torch.float64) * 4
    entropy = torch.rand(batch, length, generator=generator, dtype=torch.float64) * 3
    mask = torch.zeros(batch, length, dtype=torch.bool)
    for b in range(batch):
        mask[b, 1 + b % 3 : length - b % 2] = True
    mask[batch - 1] = False  # one sample without trainable positions
    return nll, entropy, mask


def ddp_batch(seed: int, rank1_without_targets: bool) -> dict:
    batch = random_batch(batch=DDP_BATCH, length=16, seed=seed)
    if rank1_without_targets:
        batch["labels"][DDP_RANK_ROWS:] = -100
    return batch


def _rows(batch: dict, rank: int) -> dict:
    return {key: value[rank * DDP_RANK_ROWS : (rank + 1) * DDP_RANK_ROWS] for key, value in batch.items()}


def run_select(rank: int) -> dict:
    from qtuning_plugin import QTuningConfig, select
    from qtuning_plugin.distributed import default_sample_gather

    gather = default_sample_gather()
    assert gather is not None, "default_sample_gather() must gather in a 2-rank group"
    out = {}
    for batch, first, ratio, seed in SELECT_CASES:
        nll, entropy, mask = select_batch(batch, seed)
        rows = slice(0, first) if rank == 0 else slice(first, batch)
        config = QTuningConfig(sample_keep_ratio=ratio, token_keep_ratio=0.5)
        selection = select(nll[rows], entropy[rows], mask[rows], config, sample_gather=gather)
        out[(batch, first, ratio, seed)] = {
            "sample_mask": selection.sample_mask,
            "token_mask": selection.token_mask,
            "q2": selection.q2,
            "global_keep": selection.triage.keep,
            "stats": selection.stats,
        }
    return out


def _trainer(model, config: dict):
    from transformers import Trainer, TrainingArguments

    from qtuning_plugin import QTuningConfig, QTuningTrainerMixin

    class QTuningTrainer(QTuningTrainerMixin, Trainer):
        pass

    args = TrainingArguments(
        output_dir=os.environ["QTUNING_TEST_OUT"],
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        per_device_train_batch_size=DDP_RANK_ROWS,
    )
    trainer = QTuningTrainer(model=model, args=args, qtuning_config=QTuningConfig(**config))
    trainer.events = []
    trainer.qtuning_engine.listeners.append(trainer.events.append)
    return trainer


def _step(trainer, wrapped, inner, inputs: dict) -> dict:
    """One Q-Tuning training step's loss, selection and (full) LoRA gradients."""
    wrapped.train()
    wrapped.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(wrapped, inputs)
    loss.backward()
    selection = trainer.events[-1].selection
    grads = {}
    for name, param in inner.named_parameters():
        if param.requires_grad:
            grad = param.grad
            if grad is not None and hasattr(grad, "full_tensor"):
                grad = grad.full_tensor()
            grads[name] = None if grad is None else grad.detach().clone()
    return {
        "loss": loss.detach(),
        "sample_mask": selection.sample_mask,
        "token_mask": selection.token_mask,
        "global_keep": selection.triage.keep,
        "grads": grads,
    }


def run_ddp(rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    out = {}
    for name, (seed, config, no_targets) in DDP_CASES.items():
        model = tiny_llama(seed=0)
        ddp = DistributedDataParallel(model)
        trainer = _trainer(ddp, config)
        out[name] = _step(trainer, ddp, model, _rows(ddp_batch(seed, no_targets), rank))
    return out


def _causal_lm(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def run_fsdp2(rank: int, lora: bool) -> dict:
    """FSDP2 as accelerate applies it: each decoder layer, then the root, with
    ``reshard_after_forward=True`` (the root's parameters, LM head included, are
    freed after its forward)."""
    from torch.distributed.fsdp import fully_shard

    seed, config, no_targets = DDP_CASES["basic"]
    model = tiny_llama(seed=0, lora=lora)
    for layer in _causal_lm(model).model.layers:
        fully_shard(layer, reshard_after_forward=True)
    fully_shard(model, reshard_after_forward=True)
    trainer = _trainer(model, config)
    return _step(trainer, model, model, _rows(ddp_batch(seed, no_targets), rank))


def run_fsdp1(rank: int, lora: bool) -> dict:
    """FSDP1 (`FullyShardedDataParallel`, FULL_SHARD, CPU) with one unit per decoder layer and the
    LM head in its own unit: `head_forward` runs the loss inside that unit's forward."""
    import functools

    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    seed, config, no_targets = DDP_CASES["basic"]
    model = tiny_llama(seed=0, lora=lora)
    head = _causal_lm(model).lm_head
    policy = functools.partial(
        lambda_auto_wrap_policy, lambda_fn=lambda module: isinstance(module, LlamaDecoderLayer) or module is head
    )
    wrapped = FullyShardedDataParallel(model, auto_wrap_policy=policy, use_orig_params=True, device_id=torch.device("cpu"))
    assert isinstance(_causal_lm(model).lm_head, FullyShardedDataParallel)
    trainer = _trainer(wrapped, config)
    result = _step(trainer, wrapped, wrapped, _rows(ddp_batch(seed, no_targets), rank))
    with FullyShardedDataParallel.summon_full_params(wrapped, with_grads=True):
        result["grads"] = {
            name.replace("_fsdp_wrapped_module.", ""): param.grad.detach().clone()
            for name, param in wrapped.named_parameters()
            if param.requires_grad and param.grad is not None
        }
    return result


# ---------------------------------------------------------------- Trainer runs
TRAINER_ROWS, TRAINER_LENGTH = 48, 16
TRAINER_MICRO_BATCH, TRAINER_ACCUMULATION, TRAINER_STEPS = 4, 2, 3
TRAINER_QTUNING = {"sample_keep_ratio": 0.25, "token_keep_ratio": 0.5, "log_decisions": True}
#: Triage scopes to run, passed to the worker's QTuningConfig as ``triage_scope``.
TRAINER_SCOPES = ("micro_batch", "step")
#: Rows without any trainable token: with the sequential sampler, rank 1's first micro-batch
#: (batches of 4 rows go to the ranks in turn), so that rank keeps no sample there.
TRAINER_ROWS_WITHOUT_TARGETS = slice(4, 8)
TRAINER_RUNS = {  # name: (engine, model) -- engine: ddp | zero2 | zero3 | zero3_offload; model: full | lora_head
    "ddp_full": ("ddp", "full"),
    "zero2_full": ("zero2", "full"),
    "zero3_full": ("zero3", "full"),
    # optimizer states and parameter partitions offloaded to the CPU (Axolotl's *_cpuoffload_all.json)
    "zero3_offload_full": ("zero3_offload", "full"),
    # LoRA with a fully trained LM-head copy (PEFT `ModulesToSaveWrapper`, `lora_modules_to_save: [lm_head]`)
    "ddp_lora_head": ("ddp", "lora_head"),
    "zero3_lora_head": ("zero3", "lora_head"),
}


def trainer_model(model: str):
    return tiny_llama(seed=0, lora=model == "lora_head", modules_to_save=("lm_head",) if model == "lora_head" else ())


def trainer_rows() -> dict:
    batch = random_batch(batch=TRAINER_ROWS, length=TRAINER_LENGTH, seed=5)
    batch["labels"][TRAINER_ROWS_WITHOUT_TARGETS] = -100
    return batch


def qtuning_settings(scope: str) -> dict:
    return {**TRAINER_QTUNING, "triage_scope": scope}


def deepspeed_config(engine: str) -> Optional[dict]:
    """The DeepSpeed config of a `TRAINER_RUNS` engine (None for DDP): ZeRO on CPU, fp32, with
    ``stage3_param_persistence_threshold`` 0 so that ZeRO-3 partitions even the tiny model's parameters.
    Offload keeps the run's torch optimizer (``zero_force_ds_cpu_optimizer: false``) rather than
    DeepSpeed's C++ ``cpu_adam``."""
    if engine == "ddp":
        return None
    stage, _, offload = engine.removeprefix("zero").partition("_")
    zero = {"stage": int(stage), "stage3_param_persistence_threshold": 0}
    config = {
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": False},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
    }
    if offload:
        zero.update(offload_optimizer={"device": "cpu"}, offload_param={"device": "cpu"})
        config["zero_force_ds_cpu_optimizer"] = False
    return config


def _trainable_parameters(model) -> dict:
    """Full copies of the trainable parameters (gathered from their ZeRO-3 partitions: a collective)."""
    params = {name: param for name, param in model.named_parameters() if param.requires_grad}
    gathered = contextlib.nullcontext()
    if any(hasattr(param, "ds_id") for param in params.values()):
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(list(params.values()))
    with gathered:
        return {name: param.detach().clone() for name, param in params.items()}


def run_trainer(engine: str, model_kind: str, scope: str) -> dict:
    """`Trainer.train` with the Q-Tuning mixin; what each rank fetched and selected, and the parameters."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from qtuning_plugin import QTuningTrainerMixin

    class QTuningTrainer(QTuningTrainerMixin, Trainer):
        pass

    class FetchedRows(Rows):
        def __init__(self, batch):
            super().__init__(batch)
            self.fetched: list[int] = []

        def __getitem__(self, index):
            self.fetched.append(int(index))
            return super().__getitem__(index)

    class StepParameters(TrainerCallback):
        def __init__(self):
            self.steps: list[dict] = []

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.steps.append(_trainable_parameters(model))

    args = TrainingArguments(
        output_dir=os.path.join(os.environ["QTUNING_TEST_OUT"], f"{engine}-{model_kind}-{scope}"),
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        per_device_train_batch_size=TRAINER_MICRO_BATCH,
        gradient_accumulation_steps=TRAINER_ACCUMULATION,
        max_steps=TRAINER_STEPS,
        # Plain SGD without clipping: the update is proportional to the gradient, so that a
        # wrongly scaled loss shows in the parameters (Adam and clipping would normalise it away).
        learning_rate=0.5,
        lr_scheduler_type="constant",
        optim="sgd",
        max_grad_norm=0.0,
        train_sampling_strategy="sequential",
        deepspeed=deepspeed_config(engine),
    )
    rows, parameters, selections, environ = FetchedRows(trainer_rows()), StepParameters(), [], dict(os.environ)

    def record(event):
        selection = event.selection
        selections.append(
            {"sample_mask": selection.sample_mask, "token_mask": selection.token_mask, "global_keep": selection.triage.keep}
        )

    trainer = QTuningTrainer(
        model=trainer_model(model_kind),
        args=args,
        train_dataset=rows,
        callbacks=[parameters],
        qtuning_config=qtuning_settings(scope),
        qtuning_on_selection=record,
    )
    try:
        trainer.train()
    finally:
        # A DeepSpeed run leaves ACCELERATE_USE_DEEPSPEED=true behind, which would make the next
        # run's accelerator DeepSpeed too, and transformers' global DeepSpeed config (unset here).
        os.environ.clear()
        os.environ.update(environ)
        if args.deepspeed:
            from transformers.integrations import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
    wrapped = trainer.model_wrapped
    zero = None
    if hasattr(wrapped, "zero_optimization_stage"):
        zero = {
            "stage": wrapped.zero_optimization_stage(),
            "offload": bool(wrapped.zero_offload_optimizer() and wrapped.zero_offload_param()),
        }
    from qtuning_plugin.atomic_files import read_jsonl
    from qtuning_plugin.decisions import DECISIONS_NAME

    return {
        "wrapper": (type(wrapped).__name__, zero),
        "fetched": rows.fetched,
        "selections": selections,
        "params": parameters.steps,
        "decisions": read_jsonl(os.path.join(args.output_dir, DECISIONS_NAME)) if dist.get_rank() == 0 else None,
    }


FSDP_RUNS = {  # name: (runner, LoRA)
    "fsdp2_lora": (run_fsdp2, True),
    "fsdp2_full": (run_fsdp2, False),
    "fsdp1_lora": (run_fsdp1, True),
    "fsdp1_full": (run_fsdp1, False),
}


def _reported(run, *args) -> dict:
    """``run(*args)``, or its error, reported by the test rather than crashing the whole launch."""
    try:
        return run(*args)
    except Exception as error:
        import traceback

        return {"error": f"{type(error).__name__}: {str(error)[:500]}\n{traceback.format_exc()[-3000:]}"}


def main() -> None:
    out_dir = sys.argv[1]
    os.environ["QTUNING_TEST_OUT"] = out_dir
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    results = {"select": run_select(rank), "ddp": run_ddp(rank), "fsdp": {}, "trainer": {}}
    if "fsdp" in sys.argv[2:]:
        for name, (run, lora) in FSDP_RUNS.items():
            results["fsdp"][name] = _reported(run, rank, lora)
    if "trainer" in sys.argv[2:]:
        for scope in TRAINER_SCOPES:
            results["trainer"][scope] = {
                name: _reported(run_trainer, engine, model, scope) for name, (engine, model) in TRAINER_RUNS.items()
            }
    dist.barrier()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

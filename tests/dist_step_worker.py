"""One rank of the step-scope data-parallel test (`tests/test_distributed_step.py`), launched by torchrun.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_step_worker.py OUT_DIR

Trains the tiny LoRA Llama with the real `transformers.Trainer` loop (DDP on gloo, CPU) at
``triage_scope: step``, micro-batches of `MICRO_BATCH` rows and `ACCUMULATION` of them per
step, the dataset read in order, and saves per case what this rank saw to ``OUT_DIR/rank{R}.pt``.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import Rows, random_batch, tiny_llama  # noqa: E402

MICRO_BATCH, ACCUMULATION, WORLD, STEPS = 2, 2, 2, 2
ROWS = MICRO_BATCH * ACCUMULATION * WORLD * STEPS
CASES = {
    # name: (seed of the rows, sample_keep_ratio, the first step has no trainable token, other qtuning settings)
    "quarter": (42, 0.25, False, {}),
    "three_quarters": (42, 0.75, False, {}),
    "first_step_untrainable": (43, 0.5, True, {}),
    # the second step's thresholds pool the first step's global mini-batch
    "window": (42, 0.25, False, {"triage_window": 2}),
}


def rows(seed: int, untrainable_first_step: bool) -> dict:
    batch = random_batch(batch=ROWS, length=12, seed=seed)
    if untrainable_first_step:
        batch["labels"][: ROWS // STEPS] = -100
    return batch


def rank_major_order() -> list[int]:
    """Row order of the concatenated per-step mini-batches (rank 0's micro-batches, then rank 1's).

    accelerate deals the in-order micro-batches round-robin to the ranks: micro-batch i
    (rows ``i * MICRO_BATCH ...``) goes to rank ``i % WORLD``.
    """
    order = []
    per_step = ACCUMULATION * WORLD
    for step in range(STEPS):
        batches = range(step * per_step, (step + 1) * per_step)
        for rank in range(WORLD):
            for b in batches:
                if b % WORLD == rank:
                    order += list(range(b * MICRO_BATCH, (b + 1) * MICRO_BATCH))
    return order


def train(case: str, out_dir: str, micro_batch: int, accumulation: int, order=None) -> dict:
    """Train one case; returns what this process saw (used by the workers and the 1-process reference)."""
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from qtuning_plugin import QTuningConfig, QTuningTrainerMixin
    from qtuning_plugin.modeling import unwrap_causal_lm

    class InOrderTrainer(QTuningTrainerMixin, Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    seed, ratio, untrainable, settings = CASES[case]
    data = rows(seed, untrainable)
    if order is not None:
        data = {key: value[order] for key, value in data.items()}
    model = tiny_llama(seed=0)
    seen = {"forwards_with_grad": [], "keep": []}
    unwrap_causal_lm(model).get_decoder().register_forward_hook(
        lambda _m, _a, out: seen["forwards_with_grad"].append(out[0].shape[0]) if torch.is_grad_enabled() else None
    )

    class Record(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            selection = events[-1].selection if events else None
            seen["keep"].append(None if selection is None else selection.triage.keep.clone())

    args = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=micro_batch, gradient_accumulation_steps=accumulation,
        max_steps=STEPS, learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0,
        logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
    )
    events = []
    trainer = InOrderTrainer(
        model=model, args=args, train_dataset=Rows(data), callbacks=[Record()],
        qtuning_config=QTuningConfig(triage_scope="step", sample_keep_ratio=ratio, token_keep_ratio=0.5, **settings),
        qtuning_on_selection=events.append,
    )
    trainer.train()
    seen["log"] = [entry for entry in trainer.state.log_history if "loss" in entry]
    seen["params"] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return seen


def main() -> None:
    out_dir = sys.argv[1]
    results = {case: train(case, out_dir, MICRO_BATCH, ACCUMULATION) for case in CASES}
    rank = dist.get_rank()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()


if __name__ == "__main__":
    main()

"""`axolotl train` under DeepSpeed ZeRO-3 on 2 CPU processes (torchrun, gloo), with Q-Tuning.

The config is the tiny CPU example (LoRA, with full trainable copies of the
embeddings and the LM head: `lora_modules_to_save`) plus Axolotl's own
``deepspeed_configs/zero3_bf16.json`` with bf16 off (CPU). Axolotl has no
config key for a CPU run of several processes, so the test-only
``qtuning_probe.CpuRanksPlugin`` sets ``TrainingArguments(use_cpu=True)``.
About a minute and a half on 2 CPU cores.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys

import pytest

from axolotl_run import Run, run_axolotl_train, tiny_config
from test_axolotl_train import SAMPLE_KEEP, TOKEN_KEEP, check_finished, check_records_match_spec

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed (the `test` extra)"),
]

STEPS, MICRO_BATCH, ACCUMULATION, RANKS = 4, 4, 2, 2
EXTENSIONS = os.path.join(sys.prefix, "torch_extensions")

#: axolotl-ai-cloud/axolotl `deepspeed_configs/zero3_bf16.json`, with bf16 disabled for the CPU.
ZERO3_BF16 = {
    "zero_optimization": {
        "stage": 3,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "sub_group_size": 0,
        "reduce_bucket_size": "auto",
        "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto",
        "max_live_parameters": 0,
        "max_reuse_distance": 0,
        "gather_16bit_weights_on_model_save": True,
    },
    "bf16": {"enabled": False},
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "wall_clock_breakdown": False,
}


@pytest.fixture(scope="module")
def zero3_run(tiny_model, tmp_path_factory) -> Run:
    workdir = tmp_path_factory.mktemp("zero3")
    deepspeed_json = workdir / "zero3_bf16_cpu.json"
    deepspeed_json.write_text(json.dumps(ZERO3_BF16, indent=2), encoding="utf-8")
    config = tiny_config(
        workdir,
        tiny_model,
        steps=STEPS,
        plugins=["qtuning_plugin.QTuningPlugin", "qtuning_probe.ProbePlugin", "qtuning_probe.CpuRanksPlugin"],
        qtuning={"sample_keep_ratio": SAMPLE_KEEP, "token_keep_ratio": TOKEN_KEEP},
        deepspeed=str(deepspeed_json),
        micro_batch_size=MICRO_BATCH,
        gradient_accumulation_steps=ACCUMULATION,
        val_set_size=0,
        eval_steps=None,
    )
    return run_axolotl_train(
        config,
        cli_args=["--launcher", "torchrun", "--", "--nproc_per_node", str(RANKS), "--standalone"],
        # DeepSpeed's JIT-built CPU collectives op, cached with the virtual environment (as tests/test_distributed.py)
        extra_env={"OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", EXTENSIONS)},
    )


def test_zero3_trains_on_two_ranks_and_saves(zero3_run):
    check_finished(zero3_run)
    assert "Q-Tuning is active" in zero3_run.output
    # a DeepSpeed checkpoint, its ZeRO-3 parameter partitions written by both ranks
    checkpoint = zero3_run.output_dir / f"checkpoint-{STEPS}" / f"global_step{STEPS}"
    for rank in range(RANKS):
        assert list(checkpoint.glob(f"*zero_pp_rank_{rank}_*model_states.pt")), sorted(p.name for p in checkpoint.iterdir())
    logs = zero3_run.train_logs()
    assert len(logs) == STEPS and all(math.isfinite(entry["loss"]) for entry in logs), logs


def test_zero3_triage_is_global_and_matches_spec(zero3_run):
    """Every optimizer step is triaged once over both ranks' rows (`triage_scope: step`, the
    default): the two ranks' records, concatenated, are SPEC's triage of the global mini-batch,
    and both ranks log the same global counts."""
    check_finished(zero3_run)
    per_rank = [zero3_run.probe(rank)["selections"] for rank in range(RANKS)]
    assert [len(selections) for selections in per_rank] == [STEPS] * RANKS
    merged = []
    for records in zip(*per_rank):
        assert all(record["stats"] == records[0]["stats"] for record in records)
        merged.append({key: sum((record[key] for record in records), []) for key in records[0] if key != "stats"})
    assert all(len(record["ppl"]) == RANKS * MICRO_BATCH * ACCUMULATION for record in merged)
    check_records_match_spec(merged)
    for entry in zero3_run.train_logs():
        counted = sum(entry[f"qtuning/samples_{name}"] for name in ("q1", "q2", "q3", "q4", "middle", "without_target"))
        assert counted == pytest.approx(RANKS * MICRO_BATCH * ACCUMULATION), entry

"""Step cost of Q-Tuning versus full-data SFT, measured side by side on CPU (issue 4).

Each arm runs in a fresh subprocess (so that peak RSS is its own): a
Llama-architecture model with LoRA r 8 on every linear layer, one SFT
micro-batch, and the median wall time of forward + backward over a few steps.

Arms:
  full     full-data SFT: the model's own loss (full [B, T, V] logits), all samples and tokens
  RxR      Q-Tuning at (sample, token) keep ratios, two-pass step (scoring forward without
           gradient, then forward + backward on the kept rows only)

Reported as ratios to `full`, beside the ideal step cost (1 + 3r) / 3 (SPEC section 7).
The last printed line is one JSON object.

    python benchmarks/step_cost.py            # 8 layers, hidden 512, vocab 32000, seq 256, batch 16
    python benchmarks/step_cost.py --quick    # a smaller model, under 2 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ARMS = {"1x1": (1.0, 1.0), "0.5x0.7": (0.5, 0.7), "0.25x0.5": (0.25, 0.5), "0.125x0.5": (0.125, 0.5)}
FULL = {"layers": 8, "hidden": 512, "vocab": 32000, "seq": 256, "batch": 16, "repeats": 3}
QUICK = {"layers": 4, "hidden": 256, "vocab": 32000, "seq": 128, "batch": 16, "repeats": 2}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_arm(arm: str, shape: dict) -> dict:
    """Build the model, run the steps of one arm; seconds per step and peak RSS growth in bytes."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    from qtuning_plugin import QTuningConfig, QTuningTrainerMixin

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=shape["hidden"] * 8 // 3,
        num_hidden_layers=shape["layers"],
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=shape["seq"],
        attn_implementation="sdpa",
    )
    model = get_peft_model(
        LlamaForCausalLM(config), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
    )
    model.train()

    generator = torch.Generator().manual_seed(1)
    batch, seq = shape["batch"], shape["seq"]
    input_ids = torch.randint(0, shape["vocab"], (batch, seq), generator=generator)
    labels = input_ids.clone()
    labels[:, : seq // 4] = -100  # the prompt
    inputs = {"input_ids": input_ids, "labels": labels, "attention_mask": torch.ones_like(input_ids)}

    if arm == "full":
        def step():
            model(**inputs).loss.backward()
    else:
        class QTuningTrainer(QTuningTrainerMixin, Trainer):
            pass

        sample_ratio, token_ratio = ARMS[arm]
        args = TrainingArguments(output_dir="/tmp/qtuning-step-cost", report_to=[], use_cpu=True)
        trainer = QTuningTrainer(
            model=model,
            args=args,
            qtuning_config=QTuningConfig(sample_keep_ratio=sample_ratio, token_keep_ratio=token_ratio),
        )

        def step():
            trainer.compute_loss(model, inputs).backward()

    baseline = _rss_bytes()
    times = []
    for _ in range(shape["repeats"] + 1):  # the first step warms up and is not timed
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"step_s": statistics.median(times[1:]), "peak_bytes": peak - baseline}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller model, under 2 minutes")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = QUICK if args.quick else FULL
    if args.child:
        print(json.dumps(run_arm(args.child, shape)))
        return

    print(f"model: {shape['layers']} layers, hidden {shape['hidden']}, vocab {shape['vocab']}, "
          f"seq {shape['seq']}, batch {shape['batch']}, LoRA r 8; median of {shape['repeats']} steps")
    results = {}
    for arm in ["full", *ARMS]:
        command = [sys.executable, __file__, "--child", arm] + (["--quick"] if args.quick else [])
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[arm] = json.loads(output.strip().splitlines()[-1])

    full = results["full"]
    print(f"{'arm':>10} {'step s':>8} {'time ratio':>10} {'ideal':>6} {'peak MiB':>9} {'mem ratio':>9}")
    print(f"{'full':>10} {full['step_s']:8.2f} {1.0:10.3f} {1.0:6.3f} {full['peak_bytes'] / 2**20:9.0f} {1.0:9.3f}")
    time_ratio, mem_ratio = {}, {}
    for arm, (sample_ratio, _) in ARMS.items():
        result = results[arm]
        time_ratio[arm] = round(result["step_s"] / full["step_s"], 3)
        mem_ratio[arm] = round(result["peak_bytes"] / full["peak_bytes"], 3)
        ideal = (1 + 3 * sample_ratio) / 3
        print(f"{arm:>10} {result['step_s']:8.2f} {time_ratio[arm]:10.3f} {ideal:6.3f} "
              f"{result['peak_bytes'] / 2**20:9.0f} {mem_ratio[arm]:9.3f}")
    print(json.dumps({"step_time_ratio": time_ratio, "peak_mem_ratio": mem_ratio}))


if __name__ == "__main__":
    main()

"""Step cost of Q-Tuning versus full-data SFT, measured side by side on CPU (issue 4).

Each arm runs in a fresh subprocess (so that peak RSS is its own): a
Llama-architecture model with LoRA r 8 on every linear layer, one SFT
micro-batch, and the median wall time of forward + backward over a few steps.

Arms:
  full        full-data SFT: the model's own loss (full [B, T, V] logits), all samples and tokens
  full_fused  full-data SFT through our chunked fused cross-entropy (no [B, T, V] logits): one
              forward + backward, all samples and tokens (Q-Tuning's warm-start path)
  RxR         Q-Tuning at (sample, token) keep ratios, two-pass step (scoring forward without
           gradient, then forward + backward on the kept rows only)

Reported as ratios to `full`, beside the ideal step cost (1 + 3r) / 3 (SPEC section 7).
The last printed line is one JSON object.

``--consumer``: one optimizer step at the shape of one consumer GPU, micro_batch_size 1 x
gradient accumulation 16 (16 rows), through the trainer's own step (``get_batch_samples`` +
``training_step``):
  full_mbs1     full-data SFT, the model's own loss: 16 forward + backward passes of one row
  step_0.25x0.5 Q-Tuning with ``triage_scope: step``: 16 gradient-free scoring forwards of one
                row, then forward + backward on the 4 kept rows, one per pass

    python benchmarks/step_cost.py            # 8 layers, hidden 512, vocab 32000, seq 256, batch 16
    python benchmarks/step_cost.py --quick    # a smaller model, under 2 minutes
    python benchmarks/step_cost.py --consumer # mbs 1 x GA 16, same model
    python benchmarks/step_cost.py --plot benchmarks/step_cost.png
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ARMS = {"1x1": (1.0, 1.0), "0.5x0.7": (0.5, 0.7), "0.25x0.5": (0.25, 0.5), "0.125x0.5": (0.125, 0.5)}
CONSUMER_ARMS = {"full_mbs1": None, "step_0.25x0.5": (0.25, 0.5)}
FULL = {"layers": 8, "hidden": 512, "vocab": 32000, "seq": 256, "batch": 16, "repeats": 3}
QUICK = {"layers": 4, "hidden": 256, "vocab": 8000, "seq": 128, "batch": 16, "repeats": 2}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_arm(arm: str, shape: dict) -> dict:
    """Build the model, run the steps of one arm; seconds per step and peak RSS growth in bytes."""
    from _common import build_llama, sft_batch

    config = {
        "vocab_size": shape["vocab"],
        "hidden_size": shape["hidden"],
        "intermediate_size": shape["hidden"] * 8 // 3,
        "num_hidden_layers": shape["layers"],
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "max_position_embeddings": shape["seq"],
    }
    model = build_llama(config, lora_r=8)

    inputs = sft_batch(shape["vocab"], shape["batch"], shape["seq"])
    rows = [{key: value[i : i + 1] for key, value in inputs.items()} for i in range(shape["batch"])]
    with contextlib.ExitStack() as scratch:
        return _time_steps(_step_fn(arm, model, inputs, rows, scratch), model, shape["repeats"])


def _step_fn(arm: str, model, inputs: dict, rows: list[dict], scratch: contextlib.ExitStack):
    """The training step of ``arm``; its trainer, if any, lives until ``scratch`` closes."""
    from _common import qtuning_trainer

    from qtuning_plugin import QTuningConfig

    if arm == "full_mbs1":
        def step():
            for row in rows:
                (model(**row).loss / len(rows)).backward()
    elif arm in CONSUMER_ARMS:
        sample_keep, token_keep = CONSUMER_ARMS[arm]
        config = QTuningConfig(triage_scope="step", sample_keep_ratio=sample_keep, token_keep_ratio=token_keep)
        trainer = scratch.enter_context(qtuning_trainer(model, config))

        def step():
            passes, _ = trainer.get_batch_samples(iter(rows), len(rows), model.device)
            trainer.current_gradient_accumulation_steps = len(passes)
            for micro_batch in passes:
                trainer.training_step(model, micro_batch)
    elif arm == "full":
        def step():
            model(**inputs).loss.backward()
    else:
        if arm == "full_fused":
            config = QTuningConfig(warmup_steps=10**9)  # every sample and token, one forward
        else:
            config = QTuningConfig(sample_keep_ratio=ARMS[arm][0], token_keep_ratio=ARMS[arm][1])
        trainer = scratch.enter_context(qtuning_trainer(model, config))

        def step():
            trainer.compute_loss(model, inputs).backward()
    return step


def _time_steps(step, model, repeats: int) -> dict:
    """Seconds per step (median after one warm-up step) and peak RSS growth in bytes."""
    baseline = _rss_bytes()
    times = []
    for _ in range(repeats + 1):  # the first step warms up and is not timed
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"step_s": statistics.median(times[1:]), "peak_bytes": peak - baseline}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller model, under 2 minutes")
    parser.add_argument("--consumer", action="store_true", help="one optimizer step at mbs 1 x GA 16 (see above)")
    parser.add_argument("--plot", help="write a PNG of the ratios to this path")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = QUICK if args.quick else FULL
    if args.child:
        print(json.dumps(run_arm(args.child, shape)))
        return

    print(f"model: {shape['layers']} layers, hidden {shape['hidden']}, vocab {shape['vocab']}, "
          f"seq {shape['seq']}, batch {shape['batch']}, LoRA r 8; median of {shape['repeats']} steps")
    results = {}
    for arm in CONSUMER_ARMS if args.consumer else ["full", "full_fused", *ARMS]:
        command = [sys.executable, __file__, "--child", arm] + (["--quick"] if args.quick else [])
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[arm] = json.loads(output.strip().splitlines()[-1])
    if args.consumer:
        report_consumer(results)
        return

    full = results["full"]
    ideal = {"full": 1.0, "full_fused": 1.0, **{arm: (1 + 3 * r) / 3 for arm, (r, _) in ARMS.items()}}
    time_ratio = {arm: round(result["step_s"] / full["step_s"], 3) for arm, result in results.items()}
    mem_ratio = {arm: round(result["peak_bytes"] / full["peak_bytes"], 3) for arm, result in results.items()}
    print(f"{'arm':>10} {'step s':>8} {'time ratio':>10} {'ideal':>6} {'peak MiB':>9} {'mem ratio':>9}")
    for arm, result in results.items():
        print(f"{arm:>10} {result['step_s']:8.2f} {time_ratio[arm]:10.3f} {ideal[arm]:6.3f} "
              f"{result['peak_bytes'] / 2**20:9.0f} {mem_ratio[arm]:9.3f}")
    if args.plot:
        plot(time_ratio, mem_ratio, ideal, args.plot)
    print(json.dumps({
        "step_time_ratio": {arm: time_ratio[arm] for arm in ARMS},
        "peak_mem_ratio": {arm: mem_ratio[arm] for arm in ARMS},
    }))


def report_consumer(results: dict) -> None:
    """Ratios of the Q-Tuning step to full-data SFT at the same mbs 1 x GA 16, per optimizer step."""
    full, pruned = results["full_mbs1"], results["step_0.25x0.5"]
    time_ratio = round(pruned["step_s"] / full["step_s"], 3)
    mem_ratio = round(pruned["peak_bytes"] / full["peak_bytes"], 3)
    print(f"{'arm':>14} {'step s':>8} {'peak MiB':>9}")
    for arm, result in results.items():
        print(f"{arm:>14} {result['step_s']:8.2f} {result['peak_bytes'] / 2**20:9.0f}")
    print(f"step_0.25x0.5 / full_mbs1: time {time_ratio} (ideal {(1 + 3 * 0.25) / 3:.3f}), peak memory {mem_ratio}")
    print(json.dumps({"consumer_step_time_ratio": time_ratio, "consumer_peak_mem_ratio": mem_ratio}))


def plot(time_ratio: dict, mem_ratio: dict, ideal: dict, path: str) -> None:
    """Bars of the step-time and peak-memory ratios per arm, with the ideal step cost marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(time_ratio)
    x = range(len(arms))
    figure, axis = plt.subplots(figsize=(8, 4))
    axis.bar([i - 0.2 for i in x], [time_ratio[a] for a in arms], width=0.4, label="step time / full SFT")
    axis.bar([i + 0.2 for i in x], [mem_ratio[a] for a in arms], width=0.4, label="peak memory / full SFT")
    axis.scatter(list(x), [ideal[a] for a in arms], color="black", marker="_", s=600, label="ideal (1 + 3r) / 3")
    axis.axhline(1.0, color="grey", linewidth=0.8)
    axis.set_xticks(list(x), arms)
    axis.set_xlabel("arm (sample keep ratio x token keep ratio)")
    axis.set_ylabel("ratio to full-data SFT")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()

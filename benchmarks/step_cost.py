"""Step cost of Q-Tuning versus full-data SFT, measured side by side on CPU (issues 4, 35).

Each arm runs in a fresh subprocess (so that peak RSS is its own): a
Llama-architecture model with LoRA r 8 on every linear layer (gradient checkpointing off in
every arm), one SFT micro-batch, forward + backward.

Arms:
  full        full-data SFT: the model's own loss (full [B, T, V] logits), all samples and tokens
  full_fused  full-data SFT through our chunked fused cross-entropy (no [B, T, V] logits): one
              forward + backward, all samples and tokens (Q-Tuning's warm-start path)
  RxR         Q-Tuning at (sample, token) keep ratios, two-pass step (scoring forward without
           gradient, then forward + backward on the kept rows only)

Reported as ratios to `full`, beside the ideal step cost (1 + 3r) / 3 (SPEC section 7).

``--consumer``: one optimizer step at the shape of one consumer GPU, micro_batch_size 1 x
gradient accumulation 16 (16 rows), through the trainer's own step (``get_batch_samples`` +
``training_step``):
  full_mbs1     full-data SFT, the model's own loss: 16 forward + backward passes of one row
  step_0.25x0.5 Q-Tuning with ``triage_scope: step``: the 16 rows scored in as few
                gradient-free forwards as ``scoring_batch_tokens`` (its default) allows, then
                forward + backward on the 4 kept rows, one per pass

Repeats: ``--rounds`` rounds, each running every arm once (in a fresh process: one untimed
warm-up step, then the shape's timed steps), the arms' order reversed every other round, so
that a burst of load on the machine shows as spread rather than as one arm's cost. Per arm: the
median seconds per step over every timed step, the spread (min-max and the per-round medians),
the median peak RSS growth over the rounds; per arm, the time ratio to the baseline with a 95%
bootstrap interval (steps resampled within each arm, 2000 draws, seed 0). ``uptime`` is
recorded before and after. The report is printed and, with ``--output``, written to a file; the
last printed line is one JSON object.

    python benchmarks/step_cost.py            # 8 layers, hidden 512, vocab 32000, seq 256, batch 16
    python benchmarks/step_cost.py --quick    # a smaller model, a few minutes
    python benchmarks/step_cost.py --consumer # mbs 1 x GA 16, same model
    python benchmarks/step_cost.py --output benchmarks/step_cost.txt --plot benchmarks/step_cost.png
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import random
import resource
import shlex
import statistics
import subprocess
import sys
import time

ARMS = {"1x1": (1.0, 1.0), "0.5x0.7": (0.5, 0.7), "0.25x0.5": (0.25, 0.5), "0.125x0.5": (0.125, 0.5)}
CONSUMER_ARMS = {"full_mbs1": None, "step_0.25x0.5": (0.25, 0.5)}
FULL = {"layers": 8, "hidden": 512, "vocab": 32000, "seq": 256, "batch": 16, "repeats": 2}
QUICK = {"layers": 4, "hidden": 256, "vocab": 8000, "seq": 128, "batch": 16, "repeats": 2}
ROUNDS = 3


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
        result = _time_steps(_step_fn(arm, model, inputs, rows, scratch), model, shape["repeats"])
    if CONSUMER_ARMS.get(arm):  # how the default scoring_batch_tokens grouped the step's rows
        from qtuning_plugin.engine import MicroBatch
        from qtuning_plugin.engine.scoring import plan

        _, groups = plan(model, [MicroBatch.prepare(row) for row in rows], None, data_parallel=False)
        result["scoring_rows"] = [len(group) for group in groups]
    return result


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
    """Seconds of each timed step (after one untimed warm-up step) and peak RSS growth in bytes."""
    baseline = _rss_bytes()
    times = []
    for _ in range(repeats + 1):  # the first step warms up and is not timed
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"times": times[1:], "peak_bytes": peak - baseline}


def uptime() -> str:
    """The machine's ``uptime`` line (its load averages)."""
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def ratio_interval(times: list[float], base: list[float], draws: int = 2000) -> tuple[float, float]:
    """95% bootstrap interval of median(times) / median(base), each arm's steps resampled on their own."""
    generator = random.Random(0)
    ratios = sorted(
        statistics.median(generator.choices(times, k=len(times))) / statistics.median(generator.choices(base, k=len(base)))
        for _ in range(draws)
    )
    return ratios[int(0.025 * draws)], ratios[int(0.975 * draws) - 1]


def run_rounds(arms: list[str], extra: list[str], rounds: int) -> dict:
    """Every arm once per round, each in a fresh process, the order reversed every other round:
    ``{arm: {"times": [every timed step], "round_medians": [...], "peaks": [per round]}}``."""
    results = {arm: {"times": [], "round_medians": [], "peaks": [], "scoring_rows": None} for arm in arms}
    for round_index in range(rounds):
        for arm in arms if round_index % 2 == 0 else arms[::-1]:
            command = [sys.executable, __file__, "--child", arm, *extra]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            measured = json.loads(output.strip().splitlines()[-1])
            results[arm]["times"] += measured["times"]
            results[arm]["round_medians"].append(statistics.median(measured["times"]))
            results[arm]["peaks"].append(measured["peak_bytes"])
            results[arm]["scoring_rows"] = measured.get("scoring_rows")
    return results


def summarize(results: dict, base: str) -> dict:
    """Per arm: median step seconds, spread, median peak bytes, and the ratios to ``base`` (time
    with its bootstrap interval)."""
    summary = {}
    for arm, result in results.items():
        times, base_times = result["times"], results[base]["times"]
        peak = statistics.median(result["peaks"])
        summary[arm] = {
            "step_s": statistics.median(times),
            "min_s": min(times),
            "max_s": max(times),
            "round_medians_s": [round(t, 3) for t in result["round_medians"]],
            "peak_bytes": peak,
            "time_ratio": statistics.median(times) / statistics.median(base_times),
            "time_ratio_ci95": ratio_interval(times, base_times),
            "mem_ratio": peak / statistics.median(results[base]["peaks"]),
        }
    return summary


def table(summary: dict, ideal: dict) -> list[str]:
    lines = [f"{'arm':>14} {'step s':>7} {'min-max s':>13} {'per-round medians s':>24} {'time ratio':>10} "
             f"{'95% CI':>13} {'ideal':>6} {'peak MiB':>9} {'mem ratio':>9}"]
    for arm, r in summary.items():
        low, high = r["time_ratio_ci95"]
        rounds = " ".join(f"{t:.2f}" for t in r["round_medians_s"])
        lines.append(f"{arm:>14} {r['step_s']:7.2f} {r['min_s']:6.2f}-{r['max_s']:<6.2f} {rounds:>24} "
                     f"{r['time_ratio']:10.3f} {low:6.3f}-{high:<6.3f} {ideal[arm]:6.3f} "
                     f"{r['peak_bytes'] / 2**20:9.0f} {r['mem_ratio']:9.3f}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller model, a few minutes")
    parser.add_argument("--consumer", action="store_true", help="one optimizer step at mbs 1 x GA 16 (see above)")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help=f"rounds of every arm (default {ROUNDS})")
    parser.add_argument("--output", help="also write the report to this file")
    parser.add_argument("--plot", help="write a PNG of the ratios to this path")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    shape = QUICK if args.quick else FULL
    if args.child:
        print(json.dumps(run_arm(args.child, shape)))
        return

    started = time.perf_counter()
    lines = [f"$ python benchmarks/step_cost.py {shlex.join(sys.argv[1:])}".rstrip(),
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {os.cpu_count()}-core CPU, "
             f"torch threads {_torch_threads()}",
             f"uptime before: {uptime()}",
             f"model: {shape['layers']} layers, hidden {shape['hidden']}, vocab {shape['vocab']}, "
             f"seq {shape['seq']}, batch {shape['batch']}, LoRA r 8, gradient checkpointing off; "
             f"{args.rounds} rounds x {shape['repeats']} timed steps per arm"]
    arms = list(CONSUMER_ARMS) if args.consumer else ["full", "full_fused", *ARMS]
    results = run_rounds(arms, ["--quick"] if args.quick else [], args.rounds)
    base = arms[0]
    summary = summarize(results, base)
    ratios = CONSUMER_ARMS if args.consumer else ARMS
    ideal = {arm: 1.0 for arm in arms} | {arm: (1 + 3 * r[0]) / 3 for arm, r in ratios.items() if r}
    lines += table(summary, ideal)
    lines += [f"{arm}: the step's rows scored in forwards of {results[arm]['scoring_rows']} rows "
              "(default scoring_batch_tokens)" for arm in arms if results[arm]["scoring_rows"]]
    lines.append(f"uptime after:  {uptime()}")
    lines.append(f"wall time: {time.perf_counter() - started:.0f} s")
    if args.plot:
        plot({a: r["time_ratio"] for a, r in summary.items()}, {a: r["mem_ratio"] for a, r in summary.items()},
             ideal, args.plot, {a: r["time_ratio_ci95"] for a, r in summary.items()})
    key = "consumer_" if args.consumer else ""
    measured = [arm for arm in arms if arm != base and arm != "full_fused"]
    lines.append(json.dumps({
        f"{key}step_time_ratio": {arm: round(summary[arm]["time_ratio"], 3) for arm in measured},
        f"{key}step_time_ratio_ci95": {arm: [round(x, 3) for x in summary[arm]["time_ratio_ci95"]] for arm in measured},
        f"{key}peak_mem_ratio": {arm: round(summary[arm]["mem_ratio"], 3) for arm in measured},
    }))
    report = "\n".join(lines) + "\n"
    print(report, end="")
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            handle.write(report)


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def plot(time_ratio: dict, mem_ratio: dict, ideal: dict, path: str, intervals: dict) -> None:
    """Bars of the step-time (with its 95% interval) and peak-memory ratios per arm, with the ideal
    step cost marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(time_ratio)
    x = range(len(arms))
    figure, axis = plt.subplots(figsize=(8, 4))
    errors = [[max(0.0, time_ratio[a] - intervals[a][0]) for a in arms],
              [max(0.0, intervals[a][1] - time_ratio[a]) for a in arms]]
    axis.bar([i - 0.2 for i in x], [time_ratio[a] for a in arms], width=0.4, yerr=errors, capsize=3,
             label="step time / full SFT (95% interval)")
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

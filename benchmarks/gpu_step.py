"""GPU step time and peak memory of Q-Tuning's backends versus full-data SFT with Liger (issues 5, 14, 25).

One training micro-batch (forward + backward, no optimizer step) of a Llama-architecture model
(about 0.86B parameters by default, random weights) in bfloat16 with LoRA r 16 on every linear
layer, measured in one process on one GPU:

  full/liger       plain HF-style SFT on the whole micro-batch: the decoder's hidden states and
                   Liger's LigerFusedLinearCrossEntropyFunction, mean loss over every trainable token
                   (what Axolotl's liger plugin computes in lce_forward)
  0.25x0.5/liger   Q-Tuning through the engine's micro-batch loss (what the trainer's loss runs),
                   backend liger, at the paper's budget: 25% of the samples x 50% of the kept
                   Q2 samples' tokens
  full/torch       full-data SFT through our chunked torch op (the baseline where Liger cannot
                   run, as on CPU; on a GPU it separates the backend's cost from Q-Tuning's)
  0.25x0.5/torch   Q-Tuning at the same budget with backend torch

Step time is the median of ``--repeats`` timed steps after ``--warmup`` untimed ones (Triton
compiles on the first); peak memory is ``torch.cuda.max_memory_allocated`` over those steps
(model, LoRA state and activations). Ratios are to ``full/liger`` (the consumer arms': to
``consumer/full_mbs1``).

Then the consumer shape (docs/scoring_memory.md): Llama-3-8B's layers (32, hidden 4096, MLP 14336,
32/8 heads, vocabulary 128256, random bf16 weights, not 4-bit) at sequence 2048, gradient
checkpointing, LoRA r 16, one optimizer step of ``micro_batch_size: 1`` x
``gradient_accumulation_steps: 16``, on the first backend that runs (liger, else torch):

  consumer/full_mbs1      full-data SFT, 16 forward + backward passes of one row (fused loss)
  consumer/step_0.25x0.5  Q-Tuning, ``triage_scope: step``: the 16 rows scored in forwards of
                          ``scoring_batch_tokens`` = 16 x 2048 positions (what fits beside the 4-bit
                          model on a 24 GB card, docs/scoring_memory.md), then the kept rows trained

Then the statistics pass alone, per backend, on ``[N, H]`` hidden states and a ``[V, H]`` head
(default N 16384, H 4096, V 128256, the model's dtype): the backend's ``token_stats`` (NLL and
entropy, no grad) against its ``linear_cross_entropy`` forward without grad on the same inputs,
which for ``liger`` is Liger's ``LigerFusedLinearCrossEntropyFunction`` alone.

A table is printed, then one JSON line. ``--json`` also writes the summary to a file, rewritten
after every measurement (``"complete": false`` and the measurements ``"done"`` so far), so that a
run killed at a deadline keeps what it finished; the last write says ``"complete": true``.

    python benchmarks/gpu_step.py                       # 16 layers, hidden 1536, vocab 128256, seq 2048, batch 8
    python benchmarks/gpu_step.py --device cpu --tiny   # CPU smoke run of the same logic (torch arms;
                                                        # liger arms too under TRITON_INTERPRET=1)

Exit status: 0 after a run, and 0 also when CUDA is requested but unavailable (a message says
so and nothing is measured); 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from _common import build_llama, sft_batch

BUDGETS = {"0.25x0.5": (0.25, 0.5)}  # the goals' budget; the paper's others do not serve them
# Llama-3's vocabulary; hidden 1536 and 16 layers give 0.86B parameters (0.39B of them embedding and head).
FULL = {"layers": 16, "hidden": 1536, "heads": 12, "vocab": 128256, "seq": 2048, "batch": 8, "lora_r": 16}
TINY = {"layers": 2, "hidden": 64, "heads": 4, "vocab": 509, "seq": 32, "batch": 8, "lora_r": 4}
# The statistics pass's shapes: tokens N, hidden size H (Llama-3-8B's), vocabulary V.
STATS = {"tokens": 16384, "hidden": 4096, "vocab": 128256}
STATS_TINY = {"tokens": 64, "hidden": 32, "vocab": 97}
# One consumer GPU's step at Llama-3-8B's shapes; scoring_rows: rows per scoring forward (docs/scoring_memory.md).
CONSUMER = {"layers": 32, "hidden": 4096, "intermediate": 14336, "heads": 32, "kv_heads": 8, "vocab": 128256,
            "seq": 2048, "rows": 16, "lora_r": 16, "scoring_rows": 16}
CONSUMER_TINY = {"layers": 2, "hidden": 64, "intermediate": 176, "heads": 4, "kv_heads": 2, "vocab": 509,
                 "seq": 32, "rows": 16, "lora_r": 4, "scoring_rows": 16}


def build_model(shape: dict, device: torch.device, dtype: torch.dtype):
    """A randomly initialised LlamaForCausalLM of ``shape`` with LoRA on every linear layer, in ``dtype`` on ``device``."""
    config = {
        "vocab_size": shape["vocab"],
        "hidden_size": shape["hidden"],
        "intermediate_size": shape["hidden"] * 11 // 4,
        "num_hidden_layers": shape["layers"],
        "num_attention_heads": shape["heads"],
        "num_key_value_heads": shape["heads"],
        "max_position_embeddings": shape["seq"],
    }
    return build_llama(config, device=device, dtype=dtype, lora_r=shape["lora_r"])


def backend_for(name: str, device: torch.device):
    """``(backend, None)`` for our backend ``name`` on ``device``, or ``(None, why it cannot run)``."""
    from qtuning_plugin.ops.backends import TORCH, LigerBackend, liger_problem

    if name == "torch":
        return TORCH, None
    if device.type == "cpu":  # Liger's and our Triton kernels run on CPU only in the Triton interpreter
        if os.environ.get("TRITON_INTERPRET") == "1":
            return LigerBackend(device), None
        return None, "liger on CPU runs only under TRITON_INTERPRET=1"
    problem = liger_problem(device)
    return (None, problem) if problem else (LigerBackend(device), None)


def full_step_fn(model, inputs: dict, backend):
    """Full-data SFT: mean cross-entropy over every trainable token, through ``backend``'s fused op."""
    from qtuning_plugin.modeling import final_hidden_states, lm_head_parameters, shifted_targets, unwrap_causal_lm

    weight, bias = lm_head_parameters(unwrap_causal_lm(model))
    targets = shifted_targets(inputs["labels"]).reshape(-1)

    def step() -> torch.Tensor:
        hidden = final_hidden_states(model, inputs)
        flat = hidden.reshape(-1, hidden.shape[-1])
        loss = backend.linear_cross_entropy(flat, weight, targets, bias=bias, reduction="mean")
        loss.backward()
        return loss

    return step


@contextlib.contextmanager
def qtuning_step_fn(model, inputs: dict, backend, ratios: tuple[float, float]):
    """Q-Tuning's two-pass step through the engine's micro-batch loss (what the trainer's
    `compute_loss` runs on a micro-batch), for the duration of the ``with`` block."""
    from qtuning_plugin import QTuningConfig, QTuningEngine
    from qtuning_plugin.engine import MicroBatch

    config = QTuningConfig(sample_keep_ratio=ratios[0], token_keep_ratio=ratios[1], backend=backend.name)
    # the backend already resolved (and, on CPU, liger under the interpreter)
    engine = QTuningEngine(config, backend=backend, data_parallel=False)
    batch = MicroBatch.prepare(inputs)

    def step() -> torch.Tensor:
        loss = engine.micro_batch_loss(model, batch, step=1)
        loss.backward()
        return loss

    yield step


def timed(fn, device: torch.device, warmup: int, repeats: int):
    """``(median seconds of fn(), peak allocated bytes over the timed calls or None on CPU, last result)``."""
    cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    return statistics.median(times), peak, result


def measure(step, model, device: torch.device, warmup: int, repeats: int) -> dict:
    """Median seconds per step (gradients reset before each) and peak allocated bytes (CUDA only; None on CPU)."""

    def fresh_step() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        return step()

    seconds, peak, loss = timed(fresh_step, device, warmup, repeats)
    model.zero_grad(set_to_none=True)
    return {"step_s": seconds, "peak_bytes": peak, "loss": float(loss.detach())}


def consumer_step(shape: dict, device: torch.device, dtype: torch.dtype, backend, warmup: int, repeats: int) -> dict:
    """The consumer shape's optimizer step, full-data SFT at micro-batch 1 against Q-Tuning's step scope:
    ``{arm: measure(...)}`` plus the scoring forwards Q-Tuning ran."""
    from qtuning_plugin import QTuningConfig, QTuningEngine
    from qtuning_plugin.engine import MicroBatch
    from qtuning_plugin.engine.scoring import plan

    config = {
        "vocab_size": shape["vocab"], "hidden_size": shape["hidden"], "intermediate_size": shape["intermediate"],
        "num_hidden_layers": shape["layers"], "num_attention_heads": shape["heads"],
        "num_key_value_heads": shape["kv_heads"], "max_position_embeddings": shape["seq"],
    }
    model = build_llama(config, device=device, dtype=dtype, lora_r=shape["lora_r"])
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    inputs = sft_batch(shape["vocab"], shape["rows"], shape["seq"], device)
    rows = [{key: value[i : i + 1] for key, value in inputs.items()} for i in range(shape["rows"])]
    full_steps = [full_step_fn(model, row, backend) for row in rows]

    def full_mbs1() -> torch.Tensor:
        # full_step_fn runs backward on each row's mean loss; the step's loss is their mean.
        return sum(step() for step in full_steps) / len(full_steps)

    qtuning = QTuningConfig(triage_scope="step", sample_keep_ratio=0.25, token_keep_ratio=0.5, backend=backend.name,
                            scoring_batch_tokens=shape["scoring_rows"] * shape["seq"])
    engine = QTuningEngine(qtuning, backend=backend, data_parallel=False)
    batches = [MicroBatch.prepare(row) for row in rows]

    def step_scope() -> torch.Tensor:
        losses = []
        for training_pass in engine.step_passes(model, batches, step=1):
            loss = engine.pass_loss(model, training_pass)
            loss.backward()
            losses.append(loss.detach())
        return sum(losses)

    results = {"consumer/full_mbs1": measure(full_mbs1, model, device, warmup, repeats),
               "consumer/step_0.25x0.5": measure(step_scope, model, device, warmup, repeats)}
    _, groups = plan(model, batches, qtuning.scoring_batch_tokens, data_parallel=False)
    results["consumer/step_0.25x0.5"]["scoring_forwards"] = len(groups)
    return results


def stats_inputs(shape: dict, device: torch.device, dtype: torch.dtype):
    """The statistics pass's inputs, drawn on ``device``: ``hidden [N, H]`` standard normal, ``weight [V, H]``
    scaled by ``H**-0.5`` (logits of order one), ``targets [N]`` uniform with the first quarter ignored (the
    prompt)."""
    generator = torch.Generator(device).manual_seed(2)
    n, h, v = shape["tokens"], shape["hidden"], shape["vocab"]
    hidden = torch.randn(n, h, generator=generator, device=device).to(dtype)
    weight = (torch.randn(v, h, generator=generator, device=device) * h**-0.5).to(dtype)
    targets = torch.randint(0, v, (n,), generator=generator, device=device)
    targets[: n // 4] = -100
    return hidden, weight, targets


def stats_pass(backend, inputs, device: torch.device, warmup: int, repeats: int) -> dict:
    """``backend.token_stats`` against ``backend.linear_cross_entropy``'s forward, both without grad,
    on ``inputs = (hidden, weight, targets)`` of `stats_inputs`."""
    hidden, weight, targets = inputs
    with torch.no_grad():
        stats_s, stats_peak, _ = timed(lambda: backend.token_stats(hidden, weight, targets), device, warmup, repeats)
        loss_s, loss_peak, _ = timed(
            lambda: backend.linear_cross_entropy(hidden, weight, targets, reduction="sum"), device, warmup, repeats
        )
    return {
        "stats_s": stats_s,
        "loss_forward_s": loss_s,
        "time_ratio": round(stats_s / loss_s, 3),
        "stats_peak_bytes": stats_peak,
        "loss_forward_peak_bytes": loss_peak,
    }


def run(shape: dict, stats_shape: dict, consumer_shape: dict, device: torch.device, dtype: torch.dtype, warmup: int,
        repeats: int, save: Callable[[dict, dict, int, list[str]], None]):
    """Every arm that can run on ``device`` (``{arm: measure(...) or {"skipped": reason}}``), the
    statistics pass per backend (``{backend: stats_pass(...) or {"skipped": reason}}``), the parameter
    count. After each measurement ``save(results, stats, parameters, done)`` gets what is measured so
    far, ``done`` naming the measurements in the order they finished."""
    model = build_model(shape, device, dtype)
    parameters = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    inputs = sft_batch(shape["vocab"], shape["batch"], shape["seq"], device)
    results: dict[str, dict] = {}
    stats: dict[str, dict] = {}
    done: list[str] = []
    for backend_name in ("liger", "torch"):
        backend, reason = backend_for(backend_name, device)
        if backend is None:
            results[f"full/{backend_name}"] = {"skipped": reason}
            results.update({f"{b}/{backend_name}": {"skipped": reason} for b in BUDGETS})
            stats[backend_name] = {"skipped": reason}
            continue
        print(f"backend {backend.description}")
        results[f"full/{backend_name}"] = measure(full_step_fn(model, inputs, backend), model, device, warmup, repeats)
        done.append(f"full/{backend_name}")
        save(results, stats, parameters, done)
        for budget, ratios in BUDGETS.items():
            with qtuning_step_fn(model, inputs, backend, ratios) as step:
                results[f"{budget}/{backend_name}"] = measure(step, model, device, warmup, repeats)
            done.append(f"{budget}/{backend_name}")
            save(results, stats, parameters, done)
    del model, inputs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    backend = backend_for("liger", device)[0] or backend_for("torch", device)[0]
    consumer_warmup, consumer_repeats = min(warmup, 1), min(repeats, 2)
    consumer = consumer_step(consumer_shape, device, dtype, backend, consumer_warmup, consumer_repeats)
    for arm, result in consumer.items():
        results[f"{arm}/{backend.name}"] = result
        done.append(f"{arm}/{backend.name}")
    save(results, stats, parameters, done)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    head_inputs = stats_inputs(stats_shape, device, dtype)
    for backend_name in ("liger", "torch"):
        backend, reason = backend_for(backend_name, device)
        if backend is not None:
            measured = stats_pass(backend, head_inputs, device, warmup, repeats)
            stats[backend_name] = {"path": backend.description, **measured}
            done.append(f"stats/{backend_name}")
            save(results, stats, parameters, done)
    return results, stats, parameters, done


def summarize(results: dict, stats: dict, shape: dict, stats_shape: dict, parameters: int, device: torch.device,
              done: list[str], complete: bool) -> dict:
    """The summary of what is measured so far: each arm's ratios to the baseline (``full/liger``, else
    ``full/torch``; none before either is measured)."""
    measured = [arm for arm in ("full/liger", "full/torch") if "step_s" in results.get(arm, {})]
    base_name = measured[0] if measured else None
    time_ratio, mem_ratio = {}, {}
    for arm, result in results.items():
        if "skipped" in result or base_name is None:
            continue
        # The consumer arms are ratios to full-data SFT at the same shape and backend.
        base = results[arm.replace("step_0.25x0.5", "full_mbs1")] if arm.startswith("consumer/") else results[base_name]
        time_ratio[arm] = round(result["step_s"] / base["step_s"], 3)
        peak: Optional[int] = result["peak_bytes"]
        mem_ratio[arm] = round(peak / base["peak_bytes"], 3) if peak is not None else None
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "shape": shape,
        "parameters": parameters,
        "baseline": base_name,
        "results": results,
        "step_time_ratio": time_ratio,
        "peak_mem_ratio": mem_ratio,
        "stats_shape": stats_shape,
        "stats_pass": stats,
        "done": done,
        "complete": complete,
    }


def print_tables(summary: dict) -> None:
    results, stats, stats_shape = summary["results"], summary["stats_pass"], summary["stats_shape"]
    print(f"{'arm':>16} {'step ms':>9} {'time ratio':>10} {'peak MiB':>9} {'mem ratio':>9} {'loss':>8}")
    for arm, result in results.items():
        if "skipped" in result:
            print(f"{arm:>16}  skipped: {result['skipped']}")
            continue
        peak, mem = result["peak_bytes"], summary["peak_mem_ratio"][arm]
        peak_text = f"{peak / 2**20:9.0f}" if peak is not None else f"{'n/a':>9}"
        mem_text = f"{mem:9.3f}" if mem is not None else f"{'n/a':>9}"
        print(f"{arm:>16} {result['step_s'] * 1e3:9.1f} {summary['step_time_ratio'][arm]:10.3f} {peak_text} "
              f"{mem_text} {result['loss']:8.4f}")
    print(f"\nstatistics pass, N {stats_shape['tokens']}, H {stats_shape['hidden']}, V {stats_shape['vocab']}:")
    for backend_name, result in stats.items():
        if "skipped" in result:
            print(f"{backend_name:>8}  skipped: {result['skipped']}")
        else:
            print(f"{backend_name:>8}  token_stats {result['stats_s'] * 1e3:.2f} ms, loss forward "
                  f"{result['loss_forward_s'] * 1e3:.2f} ms, ratio {result['time_ratio']:.3f}")


def write_json(path: Path, summary: dict) -> None:
    """``summary`` to ``path``, replaced in one step (a kill never leaves half a file)."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(summary, indent=1))
    os.replace(partial, path)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (a smoke run; no memory figures)")
    parser.add_argument("--tiny", action="store_true", help=f"a tiny model: {TINY}")
    parser.add_argument(
        "--dtype", default=None, choices=["bfloat16", "float32"], help="default: bfloat16 on CUDA, float32 on CPU"
    )
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per arm (2; 0 with --tiny)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per arm (5; 1 with --tiny)")
    for key, value in FULL.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=None, help=f"default {value}")
    for key, value in STATS.items():
        parser.add_argument(f"--stats-{key}", type=int, default=None, help=f"statistics pass, default {value}")
    parser.add_argument("--json", metavar="PATH", help="also write the summary to this file")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("benchmarks/gpu_step.py needs a CUDA GPU: torch.cuda.is_available() is False. Nothing measured. "
              "`--device cpu --tiny` runs the same logic on CPU as a smoke test.")
        return 0
    shape = dict(TINY if args.tiny else FULL)
    shape.update({key: getattr(args, key) for key in FULL if getattr(args, key) is not None})
    stats_shape = dict(STATS_TINY if args.tiny else STATS)
    stats_shape.update({k: getattr(args, f"stats_{k}") for k in STATS if getattr(args, f"stats_{k}") is not None})
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    warmup = args.warmup if args.warmup is not None else (0 if args.tiny else 2)
    repeats = args.repeats if args.repeats is not None else (1 if args.tiny else 5)

    print(f"device {device} ({dtype}), model: {shape}; median of {repeats} steps after {warmup} warm-up steps")

    def save(results: dict, stats: dict, parameters: int, done: list[str]) -> None:
        if args.json:
            summary = summarize(results, stats, shape, stats_shape, parameters, device, done, complete=False)
            write_json(Path(args.json), summary)
            print(f"  measured {done[-1]}; summary so far in {args.json}", flush=True)

    consumer_shape = CONSUMER_TINY if args.tiny else CONSUMER
    results, stats, parameters, done = run(shape, stats_shape, consumer_shape, device, dtype, warmup, repeats, save)
    summary = summarize(results, stats, shape, stats_shape, parameters, device, done, complete=True)
    print_tables(summary)
    print(json.dumps(summary))
    if args.json:
        write_json(Path(args.json), summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""GPU step time and peak memory of Q-Tuning's backends versus full-data SFT with Liger (issues 5, 14).

One training micro-batch (forward + backward, no optimizer step) of a Llama-architecture model
(about 0.86B parameters by default, random weights) in bfloat16 with LoRA r 16 on every linear
layer, measured in one process on one GPU:

  full/liger       plain HF-style SFT on the whole micro-batch: the decoder's hidden states and
                   Liger's LigerFusedLinearCrossEntropyFunction, mean loss over every trainable token
                   (what Axolotl's liger plugin computes in lce_forward)
  full/torch       the same with our chunked torch op
  SxT/liger        Q-Tuning, the engine's micro-batch loss (what the trainer's loss runs), backend liger, keep ratios S x T
  SxT/torch        the same with backend torch

at the paper's budgets 0.25 x 0.5, 0.125 x 0.5 and 0.5 x 0.7. Step time is the median of
``--repeats`` timed steps after ``--warmup`` untimed ones (Triton compiles on the first); peak
memory is ``torch.cuda.max_memory_allocated`` over those steps (model, LoRA state and
activations). Ratios are to ``full/liger``.

Then the statistics pass alone, per backend, on ``[N, H]`` hidden states and a ``[V, H]`` head
(default N 16384, H 4096, V 128256, the model's dtype): the backend's ``token_stats`` (NLL and
entropy, no grad) against its ``linear_cross_entropy`` forward without grad on the same inputs,
which for ``liger`` is Liger's ``LigerFusedLinearCrossEntropyFunction`` alone.

A table is printed, then one JSON line (also written to ``--json``).

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
from typing import Optional

import torch
from _common import build_llama, sft_batch

BUDGETS = {"0.25x0.5": (0.25, 0.5), "0.125x0.5": (0.125, 0.5), "0.5x0.7": (0.5, 0.7)}
# Llama-3's vocabulary; hidden 1536 and 16 layers give 0.86B parameters (0.39B of them embedding and head).
FULL = {"layers": 16, "hidden": 1536, "heads": 12, "vocab": 128256, "seq": 2048, "batch": 8, "lora_r": 16}
TINY = {"layers": 2, "hidden": 64, "heads": 4, "vocab": 509, "seq": 32, "batch": 8, "lora_r": 4}
# The statistics pass's shapes: tokens N, hidden size H (Llama-3-8B's), vocabulary V.
STATS = {"tokens": 16384, "hidden": 4096, "vocab": 128256}
STATS_TINY = {"tokens": 64, "hidden": 32, "vocab": 97}


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


def stats_pass(backend, shape: dict, device: torch.device, dtype: torch.dtype, warmup: int, repeats: int) -> dict:
    """``backend.token_stats`` against ``backend.linear_cross_entropy``'s forward, both without grad.

    Inputs: ``hidden [N, H]`` standard normal, ``weight [V, H]`` scaled by ``H**-0.5`` (logits of
    order one), targets uniform with the first quarter ignored (the prompt), in ``dtype`` on ``device``.
    """
    generator = torch.Generator().manual_seed(2)
    n, h, v = shape["tokens"], shape["hidden"], shape["vocab"]
    hidden = torch.randn(n, h, generator=generator).to(device, dtype)
    weight = (torch.randn(v, h, generator=generator) * h**-0.5).to(device, dtype)
    targets = torch.randint(0, v, (n,), generator=generator)
    targets[: n // 4] = -100
    targets = targets.to(device)
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


def run(shape: dict, stats_shape: dict, device: torch.device, dtype: torch.dtype, warmup: int, repeats: int):
    """Every arm that can run on ``device`` (``{arm: measure(...) or {"skipped": reason}}``), the
    statistics pass per backend (``{backend: stats_pass(...) or {"skipped": reason}}``), the parameter count."""
    model = build_model(shape, device, dtype)
    parameters = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    inputs = sft_batch(shape["vocab"], shape["batch"], shape["seq"], device)
    results: dict[str, dict] = {}
    stats: dict[str, dict] = {}
    for backend_name in ("liger", "torch"):
        backend, reason = backend_for(backend_name, device)
        if backend is None:
            results[f"full/{backend_name}"] = {"skipped": reason}
            results.update({f"{b}/{backend_name}": {"skipped": reason} for b in BUDGETS})
            stats[backend_name] = {"skipped": reason}
            continue
        print(f"backend {backend.description}")
        results[f"full/{backend_name}"] = measure(full_step_fn(model, inputs, backend), model, device, warmup, repeats)
        for budget, ratios in BUDGETS.items():
            with qtuning_step_fn(model, inputs, backend, ratios) as step:
                results[f"{budget}/{backend_name}"] = measure(step, model, device, warmup, repeats)
    del model, inputs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    for backend_name in ("liger", "torch"):
        backend, reason = backend_for(backend_name, device)
        if backend is not None:
            measured = stats_pass(backend, stats_shape, device, dtype, warmup, repeats)
            stats[backend_name] = {"path": backend.description, **measured}
    return results, stats, parameters


def report(results: dict, stats: dict, shape: dict, stats_shape: dict, parameters: int, device: torch.device) -> dict:
    """Print the tables; return the summary (also printed as the last line, JSON)."""
    base_name = "full/liger" if "step_s" in results.get("full/liger", {}) else "full/torch"
    base = results[base_name]
    print(f"{'arm':>16} {'step ms':>9} {'time ratio':>10} {'peak MiB':>9} {'mem ratio':>9} {'loss':>8}")
    time_ratio, mem_ratio = {}, {}
    for arm, result in results.items():
        if "skipped" in result:
            print(f"{arm:>16}  skipped: {result['skipped']}")
            continue
        time_ratio[arm] = round(result["step_s"] / base["step_s"], 3)
        peak: Optional[int] = result["peak_bytes"]
        mem = round(peak / base["peak_bytes"], 3) if peak is not None else None
        mem_ratio[arm] = mem
        peak_text = f"{peak / 2**20:9.0f}" if peak is not None else f"{'n/a':>9}"
        mem_text = f"{mem:9.3f}" if mem is not None else f"{'n/a':>9}"
        step_ms = result["step_s"] * 1e3
        print(f"{arm:>16} {step_ms:9.1f} {time_ratio[arm]:10.3f} {peak_text} {mem_text} {result['loss']:8.4f}")
    print(f"\nstatistics pass, N {stats_shape['tokens']}, H {stats_shape['hidden']}, V {stats_shape['vocab']}:")
    for backend_name, result in stats.items():
        if "skipped" in result:
            print(f"{backend_name:>8}  skipped: {result['skipped']}")
        else:
            print(f"{backend_name:>8}  token_stats {result['stats_s'] * 1e3:.2f} ms, loss forward "
                  f"{result['loss_forward_s'] * 1e3:.2f} ms, ratio {result['time_ratio']:.3f}")
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
    }


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
    results, stats, parameters = run(shape, stats_shape, device, dtype, warmup, repeats)
    summary = report(results, stats, shape, stats_shape, parameters, device)
    print(json.dumps(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

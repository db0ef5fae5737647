"""CPU benchmark of the chunked LM-head ops against naive full-logits PyTorch.

Compares, at ``N`` tokens, hidden size ``H`` and vocabulary ``V`` (float32, all targets valid):

* ``token_stats`` vs full logits + ``log_softmax`` -> NLL and entropy;
* ``linear_cross_entropy`` forward+backward (hidden and weight require grad, ``reduction="mean"``)
  vs ``F.cross_entropy(hidden @ weight.T, targets)`` + backward;
* ``token_stats`` vs a plain chunked ``hidden @ weight.T`` with the same chunk size (goal <= 1.15x).

Time: median over ``--repeats`` runs, ours and the baselines interleaved (order rotated) in each
repeat.
Peak memory: each measurement runs once in a fresh (spawned) process; the peak RSS (``VmHWM``,
reset via ``/proc/self/clear_refs`` after the inputs are allocated) minus the RSS at that point.
Ratios are ours / baseline. The last printed line is one JSON object with the ratios.

Usage: ``python benchmarks/ops_bench.py [--n 4096 --h 512 --v 32000 --repeats 5] [--quick]``
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import re
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from qtuning_plugin.ops import default_chunk_size, linear_cross_entropy, token_stats


def make_inputs(n: int, h: int, v: int, requires_grad: bool = False) -> tuple[torch.Tensor, ...]:
    """Seeded fp32 ``hidden [n, h]``, ``weight [v, h]`` and ``targets [n]``."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=gen).requires_grad_(requires_grad)
    weight = (torch.randn(v, h, generator=gen) / h**0.5).requires_grad_(requires_grad)
    targets = torch.randint(0, v, (n,), generator=gen)
    return hidden, weight, targets


@torch.no_grad()
def naive_stats(hidden, weight, targets):
    """NLL and entropy from the full ``[N, V]`` logits."""
    logp = torch.log_softmax(hidden @ weight.T, dim=-1)
    nll = -logp.gather(1, targets[:, None]).squeeze(1)
    entropy = -(logp.exp() * logp).sum(-1)
    return nll, entropy


@torch.no_grad()
def chunked_matmul(hidden, weight, targets):
    """Plain ``hidden @ weight.T`` over the chunks ``token_stats`` uses; results discarded."""
    chunk = default_chunk_size(hidden.shape[0], weight.shape[0])
    for start in range(0, hidden.shape[0], chunk):
        hidden[start : start + chunk] @ weight.T


def ours_stats(hidden, weight, targets):
    return token_stats(hidden, weight, targets)


def ours_loss(hidden, weight, targets):
    hidden.grad = weight.grad = None
    linear_cross_entropy(hidden, weight, targets, reduction="mean").backward()


def naive_loss(hidden, weight, targets):
    hidden.grad = weight.grad = None
    F.cross_entropy(hidden @ weight.T, targets).backward()


CASES: dict[str, tuple[Callable, bool]] = {
    "ours_stats": (ours_stats, False),
    "naive_stats": (naive_stats, False),
    "chunked_matmul": (chunked_matmul, False),
    "ours_loss": (ours_loss, True),
    "naive_loss": (naive_loss, True),
}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def _peak_child(case: str, n: int, h: int, v: int, queue) -> None:
    fn, requires_grad = CASES[case]
    inputs = make_inputs(n, h, v, requires_grad)
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
        f.write("5")
    baseline = _status_kib("VmRSS")
    fn(*inputs)
    queue.put((_status_kib("VmHWM") - baseline) / 1024)


def peak_mib(case: str, n: int, h: int, v: int) -> float:
    """Peak RSS increase (MiB) of one call of ``case`` in a fresh process."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_child, args=(case, n, h, v, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def median_times(cases: list[str], n: int, h: int, v: int, repeats: int) -> dict[str, float]:
    """Median wall time (s) per case; the cases run interleaved, in an order rotated every repeat,
    after one warm-up call each."""
    inputs = {case: make_inputs(n, h, v, CASES[case][1]) for case in cases}
    times = {case: [] for case in cases}
    for i in range(repeats + 1):
        for case in cases[i % len(cases) :] + cases[: i % len(cases)]:
            start = time.perf_counter()
            CASES[case][0](*inputs[case])
            if i:
                times[case].append(time.perf_counter() - start)
    return {case: statistics.median(ts) for case, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--h", type=int, default=512)
    parser.add_argument("--v", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2 repeats (overrides --repeats)")
    args = parser.parse_args()
    repeats = 2 if args.quick else args.repeats
    n, h, v = args.n, args.h, args.v
    print(
        f"N={n} H={h} V={v} fp32, chunk_size={default_chunk_size(n, v)}, "
        f"threads={torch.get_num_threads()}, repeats={repeats}"
    )

    t = {
        **median_times(["ours_stats", "naive_stats", "chunked_matmul"], n, h, v, repeats),
        **median_times(["ours_loss", "naive_loss"], n, h, v, repeats),
    }
    mem = {case: peak_mib(case, n, h, v) for case in CASES}

    rows = [
        ("token_stats", "ours_stats", "naive_stats"),
        ("linear_cross_entropy fwd+bwd", "ours_loss", "naive_loss"),
        ("token_stats vs chunked matmul", "ours_stats", "chunked_matmul"),
    ]
    print(f"{'comparison':32}{'ours s':>9}{'base s':>9}{'ratio':>8}{'ours MiB':>10}{'base MiB':>10}{'ratio':>8}")
    for name, ours, base in rows:
        print(
            f"{name:32}{t[ours]:9.3f}{t[base]:9.3f}{t[ours] / t[base]:8.3f}"
            f"{mem[ours]:10.1f}{mem[base]:10.1f}{mem[ours] / max(mem[base], 1e-9):8.3f}"
        )
    print(
        json.dumps(
            {
                "token_stats": {
                    "time_ratio": round(t["ours_stats"] / t["naive_stats"], 4),
                    "peak_mem_ratio": round(mem["ours_stats"] / mem["naive_stats"], 4),
                },
                "linear_cross_entropy": {
                    "time_ratio": round(t["ours_loss"] / t["naive_loss"], 4),
                    "peak_mem_ratio": round(mem["ours_loss"] / mem["naive_loss"], 4),
                },
                "stats_overhead_vs_matmul": round(t["ours_stats"] / t["chunked_matmul"], 4),
            }
        )
    )


if __name__ == "__main__":
    main()

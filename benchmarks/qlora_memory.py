"""Peak memory of one QLoRA training step on a Llama-3-8B-shaped model, with Q-Tuning and without (issues 5, 14).

The model has Llama-3-8B's shapes (hidden 4096, MLP 14336, 32 query and 8 key/value
heads, vocab 128256) and random weights (no hub). It is loaded as
`examples/llama3-qtuning.yml` and Axolotl's loader do it: `from_pretrained` with
bitsandbytes NF4, double quantisation and bf16 compute; gradient checkpointing
(non-reentrant); `prepare_model_for_kbit_training`; norms and embeddings back in
bf16; LoRA r 8 (alpha 16, dropout 0.05) on every linear layer of the decoder.
One micro-batch of full-length rows (the first quarter of each row is prompt).

`--quantization auto` (the default) first checks, in the child process that writes the
checkpoint, that bitsandbytes round-trips a bf16 tensor through NF4 on the device; if not, the JSON says
why (`nf4_problem`) and the model is loaded as bf16 LoRA instead (`adapter: lora`: no
quantisation, no `prepare_model_for_kbit_training`). `nf4` and `none` force either.

Arms, each in a fresh process that loads the model once and runs one step per `--batch`
(`--one-process`: all arms in one process, for a quick smoke run):
  full        all samples and tokens, the model's own loss ([B, T, V] logits, upcast to
              fp32 by transformers): plain Axolotl QLoRA
  full_fused  all samples and tokens through our fused linear cross-entropy (no [B, T, V]
              logits; on CUDA with `backend: auto` this is Liger's kernel)
  qtuning     Q-Tuning at the paper's budget, 25% of samples x 50% of the Q2 tokens,
              two-pass step (gradient-free scoring forward, then forward + backward on
              the kept rows); the rows it kept are recorded, since they depend on the
              random model's statistics

Peak memory is that of the step alone, above what the loaded model holds: on CUDA
`torch.cuda.max_memory_allocated` after a reset (and, as `peak_allocated`, the whole
process's peak with the model; `reserved`, what the caching allocator holds after the
step); on CPU the peak resident set (VmHWM, reset through /proc/self/clear_refs before
the step).

On CPU the resident set only tracks live tensors if freed memory goes back to the
system, so the children run with glibc's `MALLOC_MMAP_THRESHOLD_=131072` (every tensor
of 128 KiB or more is its own mapping, unmapped when freed).

A CPU cannot run all 32 decoder layers at sequence 2048 in reasonable time for the
full-data arms, so on CPU they run with the stack cut to `--layers` (default 1, 2
and 4). With gradient checkpointing their weights and step peak are affine in the
depth (per layer: the 4-bit weights and LoRA, and one [B, T, 4096] checkpoint kept
alive until the backward), so the two deepest give the per-layer slope and 32 layers
are extrapolated; the shallower depths check the fit. The Q-Tuning step's peak is the
larger of two phases (scoring all rows without gradient; training the kept rows),
which is not affine in depth, so that arm runs at the full 32 layers
(`--full-depth-arms`). On a GPU, run everything at full depth:

    python benchmarks/qlora_memory.py                      # CPU, batch 4, seq 2048: about 70 minutes on 2 cores
    python benchmarks/qlora_memory.py --device cuda --full-depth-arms full full_fused qtuning --batch 1 8
    python benchmarks/qlora_memory.py --tiny --full-depth-arms full full_fused qtuning --seq 32   # CPU smoke run

The last printed line is one JSON object (also written to `--json`).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LLAMA3_8B = {
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "rope_theta": 500000.0,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
FULL_DEPTH = 32
# `--tiny`: the same architecture at toy size (a CPU smoke run), full depth 2.
TINY = {**LLAMA3_8B, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}
TINY_DEPTH = 2
ARMS = ("full", "full_fused", "qtuning")
SAMPLE_KEEP, TOKEN_KEEP = 0.25, 0.5
GiB = 2**30


def _cpu_peak_reset() -> None:
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current resident set


def _cpu_rss(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", status).group(1)) * 1024


def current_bytes(cuda: bool) -> int:
    """Memory held now: allocated CUDA memory, or the process's resident set on CPU."""
    if cuda:
        import torch

        return torch.cuda.memory_allocated()
    return _cpu_rss("VmRSS")


def save_random_model(path: Path, layers: int, shape: dict) -> None:
    """A checkpoint of `shape` with `layers` decoder layers and random bf16 weights.

    Written one shard per decoder layer, so that even 32 Llama-3-8B layers (15 GiB) never sit
    in memory at once. Initialised as transformers does: normal(0, 0.02) matrices, norms at one.
    """
    import torch
    from _common import build_llama
    from safetensors.torch import save_file

    model = build_llama({**shape, "num_hidden_layers": layers, "dtype": "bfloat16"}, device="meta")
    config = model.config
    shapes = {name: p.shape for name, p in model.state_dict().items()}
    shards: dict[str, list[str]] = {}
    for name in shapes:
        layer = re.match(r"model\.layers\.(\d+)\.", name)
        shards.setdefault(f"layer-{int(layer.group(1)):02d}" if layer else "head", []).append(name)
    generator = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for shard, names in shards.items():
        tensors = {}
        for name in names:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shapes[name], dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(shapes[name], generator=generator) * 0.02).to(torch.bfloat16)
            total += tensors[name].numel() * 2
        save_file(tensors, path / f"{shard}.safetensors", metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, f"{shard}.safetensors"))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    config.save_pretrained(path)


def nf4_problem_here(device: str) -> str | None:
    """Why bitsandbytes cannot round-trip a bf16 tensor through NF4 + double quantisation on `device`, or None."""
    try:
        import torch
        from bitsandbytes import functional

        x = torch.randn(128, 64, dtype=torch.bfloat16, device=device)
        packed, state = functional.quantize_4bit(x, quant_type="nf4", compress_statistics=True)
        error = float((functional.dequantize_4bit(packed, state) - x).abs().max())
    except Exception as exception:  # ImportError, a missing native library, a CUDA error
        return f"bitsandbytes NF4 on {device} failed: {type(exception).__name__}: {exception}"
    if not error < 1.0:  # NF4 of a standard normal is off by about 0.3 at most
        return f"bitsandbytes NF4 on {device} round-trips a standard normal with a max error of {error}"
    return None


def prepare_model(model_dir: str, layers: int, tiny: bool, probe_device: str | None = None) -> str | None:
    """Write the random checkpoint, in a child process; with `probe_device`, the same child then runs
    `nf4_problem_here` there, and this returns its answer (a native crash of bitsandbytes is one too)."""
    command = [sys.executable, __file__, "--save", model_dir, "--layers", str(layers)] + (["--tiny"] if tiny else [])
    if probe_device:
        command += ["--probe-nf4", "--device", probe_device]
    proc = subprocess.run(command, capture_output=True, text=True)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if not any("saved" in line for line in lines):
        raise RuntimeError(f"writing the model failed (status {proc.returncode}):\n{proc.stderr[-4000:]}")
    if not probe_device:
        return None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return f"bitsandbytes NF4 probe exited with status {proc.returncode}: " + " | ".join(tail)
    return lines[-1]["problem"]


def load_model(path: Path, device: str, quantization: str):
    """The model as Axolotl loads it with examples/llama3-qtuning.yml: `adapter: qlora` for
    ``quantization="nf4"``, or the same settings as bf16 `adapter: lora` for ``"none"``."""
    if quantization == "none":  # unused, and maybe broken (why we are here): transformers and peft must see none
        sys.modules.setdefault("bitsandbytes", None)
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantized = {}
    if quantization == "nf4":
        quantized["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16, device_map={"": device}, attn_implementation="sdpa", **quantized
    )
    checkpointing = {"use_reentrant": False}
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    if quantization == "nf4":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs=checkpointing
        )
        for name, module in model.named_modules():  # Axolotl casts these back for flash attention
            if "norm" in name or name.endswith(("embed_tokens", "lm_head")):
                module.to(torch.bfloat16)
    else:
        model.enable_input_require_grads()
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    model.train()
    return model


class PeakMeter:
    """Peak memory above a starting point, over windows that can be closed and reopened (CUDA or CPU)."""

    def __init__(self, cuda: bool) -> None:
        import torch

        self.torch, self.cuda = torch, cuda
        gc.collect()
        self.start = current_bytes(cuda)
        self.reset()

    def reset(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
        else:
            _cpu_peak_reset()

    def peak(self) -> int:
        """The peak since the last reset, above the start."""
        if self.cuda:
            self.torch.cuda.synchronize()
            return self.torch.cuda.max_memory_allocated() - self.start
        return _cpu_rss("VmHWM") - self.start


def run_step(arm: str, model, inputs: dict, device: str) -> dict:
    """One training step of `arm` on `inputs`: its peak above the memory held before it, and for
    the fused arms each LM-head forward of the step (``phases``: rows, whether with gradient, peak
    until the next phase starts, and for Q-Tuning's scoring pass the rows and tokens it kept)."""
    import torch
    from _common import qtuning_trainer

    import qtuning_plugin.engine.engine as engine_module
    from qtuning_plugin import QTuningConfig

    cuda = device == "cuda"
    scratch = contextlib.ExitStack()
    phases: list[dict] = []
    events = []  # the engine's selection events: what the scoring pass kept
    if arm == "full":
        def loss():
            return model(**inputs).loss
    else:
        if arm == "full_fused":
            config = QTuningConfig(warmup_steps=10**9)  # every sample and token, one forward
        else:
            config = QTuningConfig(sample_keep_ratio=SAMPLE_KEEP, token_keep_ratio=TOKEN_KEEP)
        trainer = scratch.enter_context(qtuning_trainer(model, config, device))
        trainer.qtuning_engine.listeners.append(events.append)

        def loss():
            return trainer.compute_loss(model, inputs)

    head_forward = engine_module.head_forward

    def measured_head_forward(model, inputs, fn):
        if phases:  # close the previous phase's window
            phases[-1]["peak_bytes"] = meter.peak()
            meter.reset()
        phases.append({"rows": int(inputs["input_ids"].shape[0]), "grad": torch.is_grad_enabled()})
        return head_forward(model, inputs, fn)

    engine_module.head_forward = measured_head_forward
    with scratch:  # removes the trainer's output folder
        try:
            meter = PeakMeter(cuda)
            start = time.perf_counter()
            value = loss()
            value.backward()
            peak = meter.peak()
            seconds = time.perf_counter() - start
        finally:
            engine_module.head_forward = head_forward
    if phases:
        phases[-1]["peak_bytes"] = peak
    for phase in phases:
        if not phase["grad"] and events and events[-1].selection is not None:  # the scoring pass
            phase["kept_rows"] = int(events[-1].selection.sample_mask.sum())
            phase["kept_tokens"] = events[-1].kept_tokens
    step_peak = max([peak] + [phase["peak_bytes"] for phase in phases])
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_" in n and p.grad is not None]
    assert lora_grads and any(float(g.abs().max()) > 0 for g in lora_grads), "no LoRA gradient"
    result = {
        "rows": int(inputs["input_ids"].shape[0]),
        "step_peak_bytes": step_peak,
        "phases": phases,
        "step_s": seconds,
        "loss": float(value.detach()),
    }
    if cuda:
        result["peak_allocated_bytes"] = meter.start + step_peak
        result["reserved_bytes"] = torch.cuda.memory_reserved()
    return result


def run_arms(arms: list[str], path: Path, device: str, batches: list[int], seq: int, quantization: str) -> dict:
    """Load the model once and run one training step of each arm per micro-batch size in `batches`.

    Returns ``{arm: {"model_bytes": what the loaded model holds, "by_batch": {batch: run_step's result}}}``.
    """
    import torch
    from _common import sft_batch

    cuda = device == "cuda"
    before_load = current_bytes(cuda)
    model = load_model(path, device, quantization)
    loaded = current_bytes(cuda)
    results = {}
    for arm in arms:
        by_batch = {}
        for batch in batches:
            inputs = sft_batch(model.config.vocab_size, batch, seq, device)
            by_batch[str(batch)] = run_step(arm, model, inputs, device)
            model.zero_grad(set_to_none=True)
            del inputs
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        results[arm] = {"model_bytes": loaded - before_load, "by_batch": by_batch}
    return results


def extrapolate(by_depth: dict[int, float], depth: int) -> float:
    """The affine fit through the two deepest measured depths, at `depth`."""
    (d1, v1), (d2, v2) = sorted(by_depth.items())[-2:]
    return v2 + (depth - d2) * (v2 - v1) / (d2 - d1)


def run_child(args: list[str]) -> dict:
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    output = subprocess.run(
        [sys.executable, __file__, *args], check=True, capture_output=True, text=True, env=environment
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def report_arm(arm: str, layers: int, result: dict) -> None:
    """One line per batch size of a child's result for `arm`."""
    for batch, step in result["by_batch"].items():
        kept = [f"kept {p['kept_rows']}/{p['rows']} rows" for p in step["phases"] if "kept_rows" in p]
        phases = ", ".join(f"{p['rows']} rows {'with' if p['grad'] else 'no'} grad {p['peak_bytes'] / GiB:.2f}"
                           for p in step["phases"])
        print(f"  measured {layers:>2} layers {arm:>10} batch {batch:>2}: model {result['model_bytes'] / GiB:6.2f} "
              f"GiB, step peak {step['step_peak_bytes'] / GiB:6.2f} GiB, {step['step_s']:7.1f} s, "
              f"loss {step['loss']:.3f}" + (f" [{'; '.join(kept + [phases])}]" if phases else ""), flush=True)


def full_depth_summary(by_depth: dict[int, dict], batch: int, depth: int) -> dict:
    """One arm at one batch size, at `depth` layers: measured there, or extrapolated (and checked) from shallower."""
    step = {d: r["by_batch"][str(batch)] for d, r in by_depth.items()}
    if depth in by_depth:
        measured = step[depth]
        values = {"model_gib": by_depth[depth]["model_bytes"] / GiB, "step_peak_gib": measured["step_peak_bytes"] / GiB,
                  "how": "measured", "rows": measured["rows"]}
        kept = [phase["kept_rows"] for phase in measured["phases"] if "kept_rows" in phase]
        if kept:
            values["kept_rows"] = kept[0]
        if "peak_allocated_bytes" in measured:
            values["peak_allocated_gib"] = measured["peak_allocated_bytes"] / GiB
            values["reserved_gib"] = measured["reserved_bytes"] / GiB
    else:
        model = extrapolate({d: r["model_bytes"] for d, r in by_depth.items()}, depth)
        peaks = {d: r["step_peak_bytes"] for d, r in step.items()}
        deepest = sorted(by_depth)[-2:]
        values = {"model_gib": model / GiB, "step_peak_gib": extrapolate(peaks, depth) / GiB,
                  "how": f"extrapolated from {deepest[0]} and {deepest[1]} layers", "rows": batch}
        for shallower in sorted(by_depth)[:-2]:
            print(f"  check batch {batch}: step peak at {shallower} layers predicted "
                  f"{extrapolate(peaks, shallower) / GiB:.2f} GiB, measured {peaks[shallower] / GiB:.2f} GiB")
    values["total_gib"] = values["model_gib"] + values["step_peak_gib"]
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--tiny", action="store_true", help=f"a toy model of this architecture, {TINY_DEPTH} layers")
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2, 4], help="decoder depths to measure")
    parser.add_argument("--full-depth-arms", nargs="*", default=["qtuning"], choices=ARMS,
                        help=f"arms measured at full depth ({FULL_DEPTH} layers) only")
    parser.add_argument("--batch", type=int, nargs="+", default=[4], help="rows per micro-batch (one step each)")
    parser.add_argument("--seq", type=int, default=2048, help="tokens per row")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--quantization", default="auto", choices=["auto", "nf4", "none"],
                        help="nf4: QLoRA; none: bf16 LoRA; auto: nf4 if bitsandbytes runs here, else none")
    parser.add_argument("--json", metavar="PATH", help="also write the summary to this file")
    parser.add_argument("--one-process", action="store_true",
                        help="all arms of a depth in one process, one model load (a smoke run: faster, "
                             "but each arm's memory is then no longer measured on its own)")
    parser.add_argument("--child", nargs=2, metavar=("ARMS", "MODEL_DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--save", metavar="MODEL_DIR", help=argparse.SUPPRESS)
    parser.add_argument("--probe-nf4", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape, depth = (TINY, TINY_DEPTH) if args.tiny else (LLAMA3_8B, FULL_DEPTH)
    batches = sorted(set(args.batch))
    if args.save:
        save_random_model(Path(args.save), args.layers[0], shape)
        print(json.dumps({"saved": args.save}), flush=True)
        if args.probe_nf4:
            print(json.dumps({"problem": nf4_problem_here(args.device)}))
        return
    if args.child:
        arms, path = args.child
        print(json.dumps(run_arms(arms.split(","), Path(path), args.device, batches, args.seq, args.quantization)))
        return

    print(f"{'toy' if args.tiny else 'Llama-3-8B'} shapes, {depth} layers, bf16, LoRA r 8 all-linear, gradient "
          f"checkpointing; {args.device}, batch {batches}, seq {args.seq}, Q-Tuning {SAMPLE_KEEP} x {TOKEN_KEEP}",
          flush=True)
    plan: dict[int, list[str]] = {}
    for arm in args.arms:
        for layers in [depth] if arm in args.full_depth_arms else args.layers:
            plan.setdefault(layers, []).append(arm)
    results: dict[str, dict[int, dict]] = {arm: {} for arm in args.arms}
    quantization, problem = args.quantization, None
    for layers, arms in sorted(plan.items()):
        with tempfile.TemporaryDirectory() as model_dir:
            if quantization == "auto":  # checked once, by the child that writes the first checkpoint
                problem = prepare_model(model_dir, layers, args.tiny, probe_device=args.device)
                quantization = "none" if problem else "nf4"
                print("QLoRA: NF4 + double quantisation" if quantization == "nf4"
                      else f"bf16 LoRA instead of QLoRA: {problem}", flush=True)
            else:
                prepare_model(model_dir, layers, args.tiny)
            for group in [arms] if args.one_process else [[arm] for arm in arms]:
                child = ["--child", ",".join(group), model_dir, "--device", args.device, "--seq", str(args.seq),
                         "--quantization", quantization, "--batch", *map(str, batches)]
                for arm, r in run_child(child).items():
                    results[arm][layers] = r
                    report_arm(arm, layers, r)

    summary: dict[str, dict[str, dict]] = {}
    for batch in batches:
        by_arm = summary[str(batch)] = {arm: full_depth_summary(by_depth, batch, depth)
                                        for arm, by_depth in results.items()}
        print(f"\n{depth} layers, batch {batch}, seq {args.seq}:")
        print(f"{'arm':>10} {'model GiB':>9} {'step GiB':>9} {'total GiB':>9} {'step ratio':>10} {'total ratio':>11}"
              f" {'kept rows':>9}  how")
        reference = by_arm.get("full")
        for arm, values in by_arm.items():
            step_ratio = values["step_peak_gib"] / reference["step_peak_gib"] if reference else float("nan")
            total_ratio = values["total_gib"] / reference["total_gib"] if reference else float("nan")
            values.update(step_ratio_to_full=round(step_ratio, 3), total_ratio_to_full=round(total_ratio, 3))
            kept = f"{values['kept_rows']}/{values['rows']}" if "kept_rows" in values else ""
            print(f"{arm:>10} {values['model_gib']:9.2f} {values['step_peak_gib']:9.2f} {values['total_gib']:9.2f} "
                  f"{step_ratio:10.3f} {total_ratio:11.3f} {kept:>9}  {values['how']}")
    output = {
        "device": args.device, "shape": "tiny" if args.tiny else "llama3-8b", "depth": depth,
        "quantization": quantization, "nf4_problem": problem, "batches": batches, "seq": args.seq,
        "measured": {arm: {str(d): r for d, r in by_depth.items()} for arm, by_depth in results.items()},
        "full_depth": {batch: {arm: {k: round(v, 3) if isinstance(v, float) else v for k, v in values.items()}
                               for arm, values in by_arm.items()} for batch, by_arm in summary.items()},
    }
    print(json.dumps(output))
    if args.json:
        Path(args.json).write_text(json.dumps(output, indent=1))


if __name__ == "__main__":
    main()

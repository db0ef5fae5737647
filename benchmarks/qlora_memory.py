"""Peak memory of one QLoRA training step on a Llama-3-8B-shaped model, with Q-Tuning and without (issue 5).

The model has Llama-3-8B's shapes (hidden 4096, MLP 14336, 32 query and 8 key/value
heads, vocab 128256) and random weights (no hub). It is loaded as
`examples/llama3-qtuning.yml` and Axolotl's loader do it: `from_pretrained` with
bitsandbytes NF4, double quantisation and bf16 compute; gradient checkpointing
(non-reentrant); `prepare_model_for_kbit_training`; norms and embeddings back in
bf16; LoRA r 8 (alpha 16, dropout 0.05) on every linear layer of the decoder.
One micro-batch of full-length rows (the first quarter of each row is prompt).

Arms, each in a fresh process:
  full        all samples and tokens, the model's own loss ([B, T, V] logits, upcast to
              fp32 by transformers): plain Axolotl QLoRA
  full_fused  all samples and tokens through our fused linear cross-entropy (no [B, T, V]
              logits; on CUDA with `backend: auto` this is Liger's kernel)
  qtuning     Q-Tuning at the paper's budget, 25% of samples x 50% of the Q2 tokens,
              two-pass step (gradient-free scoring forward, then forward + backward on
              the kept rows)

Peak memory is that of the step alone, above what the loaded model holds: on CUDA
`torch.cuda.max_memory_allocated` after a reset; on CPU the peak resident set
(VmHWM, reset through /proc/self/clear_refs before the step).

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
    python benchmarks/qlora_memory.py --device cuda --layers 32 --batch 8

The last printed line is one JSON object.
"""

from __future__ import annotations

import argparse
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


def save_random_model(path: Path, layers: int) -> None:
    """A Llama-3-8B-shaped checkpoint with `layers` decoder layers and random bf16 weights.

    Written one shard per decoder layer, so that even 32 layers (15 GiB) never sit in memory
    at once. Initialised as transformers does: normal(0, 0.02) matrices, norms at one.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(num_hidden_layers=layers, dtype="bfloat16", **LLAMA3_8B)
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in LlamaForCausalLM(config).state_dict().items()}
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


def load_qlora(path: Path, device: str):
    """The model as Axolotl loads it for `adapter: qlora` with examples/llama3-qtuning.yml."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=quantization, dtype=torch.bfloat16, device_map={"": device},
        attn_implementation="sdpa",
    )
    checkpointing = {"use_reentrant": False}
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs=checkpointing
    )
    for name, module in model.named_modules():  # Axolotl casts these back for flash attention
        if "norm" in name or name.endswith(("embed_tokens", "lm_head")):
            module.to(torch.bfloat16)
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


def run_arm(arm: str, path: Path, device: str, batch: int, seq: int) -> dict:
    """Load the model and run one training step of `arm`.

    Returns the bytes the loaded model holds, the step's peak above that, and for the
    fused arms each LM-head forward of the step (``phases``: rows, whether with
    gradient, peak until the next phase starts, and for Q-Tuning's scoring pass the
    rows it kept): which rows the triage keeps depends on the random model's
    statistics, so the kept count is part of the result.
    """
    import torch
    from _common import qtuning_trainer, sft_batch

    import qtuning_plugin.trainer as qtuning_trainer_module
    from qtuning_plugin import QTuningConfig

    cuda = device == "cuda"
    before_load = current_bytes(cuda)
    model = load_qlora(path, device)
    loaded = current_bytes(cuda)
    inputs = sft_batch(LLAMA3_8B["vocab_size"], batch, seq, device)

    if arm == "full":
        def loss():
            return model(**inputs).loss
    else:
        if arm == "full_fused":
            config = QTuningConfig(warmup_steps=10**9)  # every sample and token, one forward
        else:
            config = QTuningConfig(sample_keep_ratio=SAMPLE_KEEP, token_keep_ratio=TOKEN_KEEP)
        trainer = qtuning_trainer(model, config, device)

        def loss():
            return trainer.compute_loss(model, inputs)

    phases: list[dict] = []
    head_forward = qtuning_trainer_module.head_forward

    def measured_head_forward(model, inputs, fn):
        if phases:  # close the previous phase's window
            phases[-1]["peak_bytes"] = meter.peak()
            meter.reset()
        phases.append({"rows": int(inputs["input_ids"].shape[0]), "grad": torch.is_grad_enabled()})
        result = head_forward(model, inputs, fn)
        if not torch.is_grad_enabled():  # the scoring pass returns (sample_mask, token_mask)
            phases[-1]["kept_rows"] = int(result[0].sum())
            phases[-1]["kept_tokens"] = int(result[1].sum())
        return result

    qtuning_trainer_module.head_forward = measured_head_forward
    meter = PeakMeter(cuda)
    start = time.perf_counter()
    value = loss()
    value.backward()
    peak = meter.peak()
    seconds = time.perf_counter() - start
    if phases:
        phases[-1]["peak_bytes"] = peak
    step_peak = max([peak] + [phase["peak_bytes"] for phase in phases])
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_" in n and p.grad is not None]
    assert lora_grads and any(float(g.abs().max()) > 0 for g in lora_grads), "no LoRA gradient"
    return {
        "model_bytes": loaded - before_load,
        "step_peak_bytes": step_peak,
        "phases": phases,
        "step_s": seconds,
        "loss": float(value.detach()),
    }


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2, 4], help="decoder depths to measure")
    parser.add_argument("--full-depth-arms", nargs="*", default=["qtuning"], choices=ARMS,
                        help=f"arms measured at {FULL_DEPTH} layers only")
    parser.add_argument("--batch", type=int, default=4, help="rows per micro-batch")
    parser.add_argument("--seq", type=int, default=2048, help="tokens per row")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--child", nargs=2, metavar=("ARM", "MODEL_DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--save", metavar="MODEL_DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.save:
        save_random_model(Path(args.save), args.layers[0])
        print(json.dumps({"saved": args.save}))
        return
    if args.child:
        arm, path = args.child
        print(json.dumps(run_arm(arm, Path(path), args.device, args.batch, args.seq)))
        return

    print(f"Llama-3-8B shapes, QLoRA NF4 + double quant, bf16, LoRA r 8 all-linear, gradient checkpointing; "
          f"{args.device}, batch {args.batch}, seq {args.seq}, Q-Tuning {SAMPLE_KEEP} x {TOKEN_KEEP}", flush=True)
    plan: dict[int, list[str]] = {}
    for arm in args.arms:
        for layers in [FULL_DEPTH] if arm in args.full_depth_arms else args.layers:
            plan.setdefault(layers, []).append(arm)
    results: dict[str, dict[int, dict]] = {arm: {} for arm in args.arms}
    for layers, arms in sorted(plan.items()):
        with tempfile.TemporaryDirectory() as model_dir:
            run_child(["--save", model_dir, "--layers", str(layers)])
            for arm in arms:
                child = ["--child", arm, model_dir, "--device", args.device, "--batch", str(args.batch), "--seq", str(args.seq)]
                r = results[arm][layers] = run_child(child)
                kept = [f"kept {p['kept_rows']}/{p['rows']} rows" for p in r["phases"] if "kept_rows" in p]
                phases = ", ".join(f"{p['rows']} rows {'with' if p['grad'] else 'no'} grad {p['peak_bytes'] / GiB:.2f}"
                                   for p in r["phases"])
                print(f"  measured {layers:>2} layers {arm:>10}: model {r['model_bytes'] / GiB:6.2f} GiB, "
                      f"step peak {r['step_peak_bytes'] / GiB:6.2f} GiB, {r['step_s']:7.1f} s, loss {r['loss']:.3f}"
                      + (f" [{'; '.join(kept + [phases])}]" if phases else ""), flush=True)

    summary = {}
    for arm, by_depth in results.items():
        if FULL_DEPTH in by_depth:
            model, step = by_depth[FULL_DEPTH]["model_bytes"], by_depth[FULL_DEPTH]["step_peak_bytes"]
            how = "measured"
        else:
            model = extrapolate({d: r["model_bytes"] for d, r in by_depth.items()}, FULL_DEPTH)
            step = extrapolate({d: r["step_peak_bytes"] for d, r in by_depth.items()}, FULL_DEPTH)
            deepest = sorted(by_depth)[-2:]
            how = f"extrapolated from {deepest[0]} and {deepest[1]} layers"
            for depth in sorted(by_depth)[:-2]:
                predicted = extrapolate({d: r["step_peak_bytes"] for d, r in by_depth.items()}, depth)
                print(f"  check {arm}: step peak at {depth} layers predicted {predicted / GiB:.2f} GiB, "
                      f"measured {by_depth[depth]['step_peak_bytes'] / GiB:.2f} GiB")
        summary[arm] = {"model_gib": model / GiB, "step_peak_gib": step / GiB, "total_gib": (model + step) / GiB, "how": how}

    print(f"\n{FULL_DEPTH} layers, batch {args.batch}, seq {args.seq}:")
    print(f"{'arm':>10} {'model GiB':>9} {'step GiB':>9} {'total GiB':>9} {'step ratio':>10} {'total ratio':>11}  how")
    reference = summary.get("full")
    for arm, values in summary.items():
        step_ratio = values["step_peak_gib"] / reference["step_peak_gib"] if reference else float("nan")
        total_ratio = values["total_gib"] / reference["total_gib"] if reference else float("nan")
        values.update(step_ratio_to_full=round(step_ratio, 3), total_ratio_to_full=round(total_ratio, 3))
        print(f"{arm:>10} {values['model_gib']:9.2f} {values['step_peak_gib']:9.2f} {values['total_gib']:9.2f} "
              f"{step_ratio:10.3f} {total_ratio:11.3f}  {values['how']}")
    print(json.dumps({
        "device": args.device, "batch": args.batch, "seq": args.seq,
        "measured": {arm: {str(d): r for d, r in by_depth.items()} for arm, by_depth in results.items()},
        "full_depth": {arm: {k: round(v, 3) if isinstance(v, float) else v for k, v in values.items()}
                       for arm, values in summary.items()},
    }))


if __name__ == "__main__":
    main()

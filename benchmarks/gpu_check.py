"""The GPU check (issue 14): CUDA parity tests, the step benchmark and the QLoRA memory benchmark, one report.

    scripts/gpu_check.sh [--smoke] [--out DIR] [--fresh] [parity] [step] [qlora] [all]

`scripts/gpu_check.sh` installs the carried wheels first and then runs this file. Stages, in
this order, each in its own process:

  parity  the tests marked ``cuda`` in tests/test_liger_backend.py and tests/test_ops_torch_chunked.py
          (Triton/Liger and chunked ops against references: values and gradients, float32 and
          bfloat16, a vocabulary that is not a multiple of the block) with QTUNING_REQUIRE_CUDA=1,
          so that a skipped CUDA test is a failure; counted from pytest's JUnit XML. The test
          needing liger-kernel's cutedsl extra runs only where that extra is installed (the report
          says when it was not).
  step    benchmarks/gpu_step.py at its default shape (a 0.86B-parameter Llama, seq 2048, batch 8,
          bf16, LoRA): full-data SFT with Liger's fused linear cross-entropy vs our liger and torch
          backends at 25% x 50%, 12.5% x 50% and 50% x 70%; then the statistics pass alone
          (N 16384, H 4096, V 128256) against Liger's fused linear cross-entropy forward.
  qlora   benchmarks/qlora_memory.py --device cuda at Llama-3-8B shapes, all 32 layers, at the
          micro-batch of examples/llama3-qtuning.yml (read from it) and at 8 rows: peak memory of
          plain QLoRA, fused-loss QLoRA and Q-Tuning 25% x 50%, with the rows Q-Tuning kept
          (bf16 LoRA instead, with the reason, where bitsandbytes cannot run).

--smoke runs the same stages on CPU at toy shapes (parity: the CPU cases of two tests of
tests/test_ops_torch_chunked.py), so that the test suite keeps this command working; its numbers
mean nothing.

The report is OUT/gpu_check.json and OUT/gpu_check.md (rendered from the JSON), OUT being --out,
else $OUT if set, else benchmarks/gpu. A run merges into the report already in OUT, else into
benchmarks/gpu/gpu_check.json (so that stages run in separate calls end up in one report),
replacing the stages it runs; --fresh starts from nothing, and a smoke report never merges with a
GPU one. Each stage's output also goes to OUT/gpu_check_<stage>.log. The goals of the issue are
evaluated from the measured numbers and reported, never asserted. Exit status: 1 if a stage run
now failed, else 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from importlib import metadata
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
REPORT, MARKDOWN = "gpu_check.json", "gpu_check.md"
DEFAULT_OUT = ROOT / "benchmarks" / "gpu"
STAGES = ("parity", "step", "qlora")
EXAMPLE = ROOT / "examples" / "llama3-qtuning.yml"
COMPARISON_ROWS = 8  # the README's CPU-derived QLoRA estimate is for micro-batches of 8 rows
PACKAGES = ("torch", "triton", "liger-kernel", "nvidia-cutlass-dsl", "bitsandbytes", "transformers", "peft",
            "accelerate", "pydantic")
GiB, MiB = 2**30, 2**20
LIMITS = {"stats_pass": 1.10, "step_time": 0.60, "step_memory": 0.40, "example_memory_gib": 15.0}


# ---------------------------------------------------------------------------------- helpers
def environment(smoke: bool) -> dict:
    """Python, package versions and the GPU (from nvidia-smi: this process never touches CUDA)."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    gpu = None
    if not smoke:
        query = "name,compute_cap,memory.total,driver_version"
        try:
            line = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                                  capture_output=True, text=True, check=True).stdout.strip().splitlines()[0]
            gpu = dict(zip(query.split(","), (field.strip() for field in line.split(","))))
        except (OSError, subprocess.CalledProcessError, IndexError) as error:
            gpu = {"error": f"nvidia-smi: {error}"}
    try:  # the device machine's copy of the working tree may come without git or .git
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip() or None
    except OSError:
        commit = None
    return {"python": platform.python_version(), "packages": versions, "gpu": gpu, "commit": commit}


def run_logged(command: list[str], log: Path, env: Optional[dict] = None) -> int:
    """Run ``command`` from the repository root, its output to this process's stdout and to ``log``."""
    print(f"\n$ {' '.join(command)}", flush=True)
    with log.open("w") as log_file:
        log_file.write(f"$ {' '.join(command)}\n")
        proc = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in proc.stdout:
            sys.stdout.write(line)
            log_file.write(line)
        return proc.wait()


def junit_outcomes(path: Path) -> dict:
    """Counts of passed/failed/errors/skipped test cases in a JUnit XML file, and the cases that did not pass."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    not_passed = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "errors", "skipped": "skipped"}[child.tag]
                message = (child.get("message") or child.text or "").strip()
                break
        counts[outcome] += 1
        if outcome != "passed":
            not_passed.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                               "message": message[:500]})
    return {"counts": counts, "not_passed": not_passed}


def example_settings(path: Path = EXAMPLE) -> dict:
    """The micro-batch, gradient accumulation and sequence length that ``path`` trains with."""
    import yaml

    config = yaml.safe_load(path.read_text())
    return {
        "file": str(path.relative_to(ROOT)),
        "micro_batch_size": int(config["micro_batch_size"]),
        "gradient_accumulation_steps": int(config["gradient_accumulation_steps"]),
        "sequence_len": int(config["sequence_len"]),
    }


# ----------------------------------------------------------------------------------- stages
def parity_stage(smoke: bool, out: Path, env: dict) -> dict:
    junit = out / "gpu_check_parity.xml"
    if smoke:
        selection = ["-m", "not cuda", "-k", "test_single_token or test_all_targets_ignored",
                     "tests/test_ops_torch_chunked.py"]
        not_run = {}
    else:
        marker, not_run = "cuda", {}
        if env["packages"]["nvidia-cutlass-dsl"] is None or (env["gpu"] or {}).get("compute_cap") != "9.0":
            marker = "cuda and not cutedsl"
            not_run["tests marked cutedsl"] = (
                "Liger's fused scaled cross-entropy kernel needs liger-kernel's cutedsl extra "
                f"(nvidia-cutlass-dsl: {env['packages']['nvidia-cutlass-dsl'] or 'not installed'}; its CUDA 13 "
                "library wheel is 92 MB, over the 64 MiB a device call carries) on an sm90 GPU "
                f"(this one: {(env['gpu'] or {}).get('compute_cap')})"
            )
        selection = ["-m", marker, "tests/test_liger_backend.py", "tests/test_ops_torch_chunked.py"]
    command = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", "--junitxml", str(junit),
               *selection]
    returncode = run_logged(command, out / "gpu_check_parity.log", {"QTUNING_REQUIRE_CUDA": "1"})
    result = {"command": " ".join(command[1:]), "returncode": returncode, "not_run": not_run}
    if not junit.exists():
        return {**result, "ok": False, "problem": "pytest wrote no JUnit XML"}
    result.update(junit_outcomes(junit))
    counts = result["counts"]
    result["ok"] = returncode == 0 and counts["passed"] > 0 and counts["passed"] == sum(counts.values())
    return result


def step_stage(smoke: bool, out: Path, scratch: Path) -> dict:
    summary = scratch / "step.json"
    command = [sys.executable, "benchmarks/gpu_step.py", "--json", str(summary)]
    if smoke:
        command += ["--device", "cpu", "--tiny"]
    returncode = run_logged(command, out / "gpu_check_step.log")
    result = {"command": " ".join(command[1:]), "returncode": returncode}
    if returncode != 0 or not summary.exists():
        return {**result, "ok": False, "problem": "benchmarks/gpu_step.py failed (see gpu_check_step.log)"}
    result["summary"] = json.loads(summary.read_text())
    skipped = [arm for arm, r in result["summary"]["results"].items() if "skipped" in r]
    skipped += [f"stats/{b}" for b, r in result["summary"]["stats_pass"].items() if "skipped" in r]
    result["ok"] = smoke or not skipped  # on the GPU every arm must run
    if skipped and not smoke:
        result["problem"] = f"arms skipped on the GPU: {', '.join(skipped)}"
    return result


def qlora_stage(smoke: bool, out: Path, scratch: Path) -> dict:
    example = example_settings()
    batches = sorted({example["micro_batch_size"], COMPARISON_ROWS})
    summary = scratch / "qlora.json"
    command = [sys.executable, "benchmarks/qlora_memory.py", "--full-depth-arms", "full", "full_fused", "qtuning",
               "--batch", *map(str, batches), "--json", str(summary)]
    if smoke:
        command += ["--device", "cpu", "--tiny", "--seq", "32", "--one-process"]
    else:
        command += ["--device", "cuda", "--seq", str(example["sequence_len"])]
    returncode = run_logged(command, out / "gpu_check_qlora.log")
    result = {"command": " ".join(command[1:]), "returncode": returncode, "example": example}
    if returncode != 0 or not summary.exists():
        return {**result, "ok": False, "problem": "benchmarks/qlora_memory.py failed (see gpu_check_qlora.log)"}
    return {**result, "summary": json.loads(summary.read_text()), "ok": True}


# ------------------------------------------------------------------------------------ goals
def goals(report: dict) -> list[dict]:
    """The issue's goals, each with the measured value (None, with a note, where it was not measured)."""
    stages = report["stages"]
    step = stages.get("step", {}).get("summary")
    qlora = stages.get("qlora", {})
    rows = []

    def goal(name: str, text: str, value: Optional[float], note: str = "") -> None:
        limit = LIMITS[name]
        met = None if value is None else value <= limit if name != "example_memory_gib" else value < limit
        if report["mode"] == "smoke":  # toy shapes on CPU: the value is computed, the goal not judged
            met, note = None, f"smoke run. {note}"
        rows.append({"goal": name, "text": text, "limit": limit, "value": value, "met": met, "note": note})

    stats = (step or {}).get("stats_pass", {}).get("liger", {})
    shape = (step or {}).get("stats_shape", {})
    goal("stats_pass", "statistics pass (backend liger) / Liger fused linear CE forward, both without grad, "
         f"N {shape.get('tokens')}, H {shape.get('hidden')}, V {shape.get('vocab')}", stats.get("time_ratio"),
         stats.get("skipped", "" if step else "step stage not run"))
    base = (step or {}).get("results", {}).get("full/liger", {})
    arm = (step or {}).get("results", {}).get("0.25x0.5/liger", {})
    missing = "step stage not run" if not step else base.get("skipped") or arm.get("skipped", "")
    time_ratio = arm["step_s"] / base["step_s"] if "step_s" in arm and "step_s" in base else None
    goal("step_time", "Q-Tuning 25% x 50% step (backend liger) / Liger full-data step, time", time_ratio, missing)
    peaks = [r.get("peak_bytes") for r in (arm, base)]
    memory_ratio = peaks[0] / peaks[1] if None not in peaks else None
    goal("step_memory", "the same, peak torch.cuda.max_memory_allocated", memory_ratio,
         missing or ("" if memory_ratio is not None else "no CUDA memory figures on CPU"))

    summary = qlora.get("summary")
    value, note = None, "qlora stage not run"
    if summary:
        micro_batch = str(qlora["example"]["micro_batch_size"])
        arms = summary["full_depth"][micro_batch]
        key = "peak_allocated_gib" if "peak_allocated_gib" in arms["qtuning"] else "total_gib"
        value = max(arms["qtuning"][key], arms["full_fused"][key])
        note = (f"max of qtuning and full_fused ({key}; a step that keeps every row is full_fused) at micro-batch "
                f"{micro_batch}; CUDA context and optimizer state not included")
        if summary["quantization"] != "nf4":
            value, note = None, f"not QLoRA: bf16 LoRA measured instead ({summary['nf4_problem']})"
    goal("example_memory_gib", f"{qlora.get('example', {}).get('file', 'the example')} settings, "
         "peak GiB of a Q-Tuning step", value, note)
    return rows


# --------------------------------------------------------------------------------- markdown
def _number(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown(report: dict) -> str:
    stages = report["stages"]
    lines = ["# GPU check", ""]
    if report["mode"] == "smoke":
        lines += ["**Smoke run on CPU at toy shapes**: it checks that the command works; its numbers mean nothing.",
                  ""]
    lines += ["Written by `scripts/gpu_check.sh` (benchmarks/gpu_check.py) from gpu_check.json.", "",
              "## Goals", "", "| goal | limit | measured | met | note |", "|---|---|---|---|---|"]
    for row in report["goals"]:
        met = {True: "yes", False: "**no**", None: "not measured"}[row["met"]]
        lines.append(f"| {row['text']} | {row['limit']} | {_number(row['value'])} | {met} | {row['note']} |")
    lines += ["", "## Stages", "", "| stage | status | finished | GPU | commit | torch | triton | liger-kernel | "
              "bitsandbytes | transformers | peft | wall s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in STAGES:
        if name not in stages:
            continue
        stage, env = stages[name], stages[name]["environment"]
        gpu = env["gpu"] or {}
        gpu_text = f"{gpu.get('name')} (sm {gpu.get('compute_cap')}, {gpu.get('memory.total')})" if "name" in gpu \
            else gpu.get("error", "none (CPU)")
        versions = " | ".join(str(env["packages"].get(p)) for p in ("torch", "triton", "liger-kernel", "bitsandbytes",
                                                                     "transformers", "peft"))
        status = "ok" if stage["ok"] else f"**failed**: {stage.get('problem', 'see its log')}"
        lines.append(f"| {name} | {status} | {env['finished']} | {gpu_text} | {env['commit']} | {versions} | "
                     f"{stage['wall_s']:.0f} |")
    if "parity" in stages:
        parity = stages["parity"]
        lines += ["", "## Parity tests", "", f"`pytest {parity['command'].split(' ', 2)[-1]}` with "
                  "`QTUNING_REQUIRE_CUDA=1` (a skipped CUDA test is a failure)."]
        if "counts" in parity:
            lines += ["", "| passed | failed | errors | skipped |", "|---|---|---|---|",
                      "| {passed} | {failed} | {errors} | {skipped} |".format(**parity["counts"])]
            lines += [f"- {case['outcome']}: `{case['test']}`: {case['message'][:200]}" for case in
                      parity["not_passed"]]
        lines += [f"- not run: {what}: {why}" for what, why in parity["not_run"].items()]
    step = stages.get("step", {}).get("summary")
    if step:
        shape = step["shape"]
        lines += ["", "## Step time and peak memory", "",
                  f"{step['device']}: Llama, {shape['layers']} layers, hidden {shape['hidden']}, vocab "
                  f"{shape['vocab']}, {step['parameters'] / 1e6:.1f}M parameters, LoRA r {shape['lora_r']}, "
                  f"{shape['batch']} rows x "
                  f"{shape['seq']} tokens. Ratios to `{step['baseline']}`.", "",
                  "| arm | step ms | time ratio | peak MiB | memory ratio | loss |", "|---|---|---|---|---|---|"]
        for arm, r in step["results"].items():
            if "skipped" in r:
                lines.append(f"| {arm} | skipped: {r['skipped']} | | | | |")
                continue
            peak = None if r["peak_bytes"] is None else r["peak_bytes"] / MiB
            lines.append(f"| {arm} | {r['step_s'] * 1e3:.1f} | {_number(step['step_time_ratio'][arm])} | "
                         f"{_number(peak, 0)} | {_number(step['peak_mem_ratio'][arm])} | {r['loss']:.4f} |")
        stats_shape = step["stats_shape"]
        lines += ["", f"Statistics pass, N {stats_shape['tokens']}, H {stats_shape['hidden']}, "
                  f"V {stats_shape['vocab']}, no grad:", "",
                  "| backend | token_stats ms | loss forward ms | ratio | path |", "|---|---|---|---|---|"]
        for backend, r in step["stats_pass"].items():
            if "skipped" in r:
                lines.append(f"| {backend} | skipped: {r['skipped']} | | | |")
            else:
                lines.append(f"| {backend} | {r['stats_s'] * 1e3:.2f} | {r['loss_forward_s'] * 1e3:.2f} | "
                             f"{_number(r['time_ratio'])} | {r['path']} |")
    qlora = stages.get("qlora", {})
    if qlora.get("summary"):
        summary, example = qlora["summary"], qlora["example"]
        how = "QLoRA (NF4, double quantisation, bf16 compute)" if summary["quantization"] == "nf4" else \
            f"**bf16 LoRA, not QLoRA**: {summary['nf4_problem']}"
        lines += ["", "## QLoRA memory", "",
                  f"{summary['shape']} shapes, {summary['depth']} layers, {how}, gradient checkpointing, "
                  f"seq {summary['seq']}; {example['file']}: micro_batch_size {example['micro_batch_size']} x "
                  f"gradient_accumulation_steps {example['gradient_accumulation_steps']}. GiB; peak allocated and "
                  "reserved are the whole process's (CUDA only).", "",
                  "| rows | arm | model | step peak | model + step | peak allocated | reserved | kept rows | how |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for batch, arms in summary["full_depth"].items():
            for arm, v in arms.items():
                kept = f"{v['kept_rows']}/{v['rows']}" if "kept_rows" in v else ""
                lines.append(f"| {batch} | {arm} | {v['model_gib']:.2f} | {v['step_peak_gib']:.2f} | "
                             f"{v['total_gib']:.2f} | {_number(v.get('peak_allocated_gib'), 2)} | "
                             f"{_number(v.get('reserved_gib'), 2)} | {kept} | {v['how']} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------- main
def load_previous(out: Path, mode: str) -> dict:
    """The report to merge into: OUT's, else benchmarks/gpu's, if of the same mode; else an empty one."""
    for path in (out / REPORT, DEFAULT_OUT / REPORT):
        if path.exists():
            report = json.loads(path.read_text())
            if report.get("mode") == mode:
                print(f"merging into {path}")
                return report
    return {"mode": mode, "stages": {}}


def write(report: dict, out: Path) -> None:
    report["goals"] = goals(report)
    (out / REPORT).write_text(json.dumps(report, indent=1) + "\n")
    (out / MARKDOWN).write_text(markdown(report))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stages", nargs="*", metavar="STAGE",
                        help=f"{', '.join(STAGES)} or all (default)")
    parser.add_argument("--smoke", action="store_true", help="on CPU at toy shapes (the test suite's run)")
    parser.add_argument("--out", type=Path, default=None, help="report folder (default: $OUT, else benchmarks/gpu)")
    parser.add_argument("--fresh", action="store_true", help="do not merge into an existing report")
    args = parser.parse_args(argv)
    unknown = set(args.stages) - {*STAGES, "all"}
    if unknown:
        parser.error(f"unknown stage {', '.join(sorted(unknown))}: choose from {', '.join(STAGES)}, all")
    stages = list(STAGES) if not args.stages or "all" in args.stages else [s for s in STAGES if s in args.stages]
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else DEFAULT_OUT)
    out.mkdir(parents=True, exist_ok=True)
    mode = "smoke" if args.smoke else "gpu"
    report = {"mode": mode, "stages": {}} if args.fresh else load_previous(out, mode)
    env = environment(args.smoke)
    if not args.smoke and "name" not in (env["gpu"] or {}):
        print(f"gpu_check needs an NVIDIA GPU ({env['gpu']}); `--smoke` runs it on CPU at toy shapes.")
        return 1
    failed = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        for name in stages:
            print(f"\n=== gpu_check stage {name} ({mode})", flush=True)
            start = time.perf_counter()
            if name == "parity":
                result = parity_stage(args.smoke, out, env)
            elif name == "step":
                result = step_stage(args.smoke, out, Path(scratch))
            else:
                result = qlora_stage(args.smoke, out, Path(scratch))
            result["wall_s"] = time.perf_counter() - start
            result["environment"] = {**env, "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
            report["stages"][name] = result
            write(report, out)
            if not result["ok"]:
                failed.append(name)
    print("\n" + (out / MARKDOWN).read_text())
    print(f"report: {out / REPORT}, {out / MARKDOWN}" + (f"; failed stages: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

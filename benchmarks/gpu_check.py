"""The GPU check (issues 14, 25): CUDA parity tests, the step benchmark and the QLoRA memory benchmark,
one report, inside a time budget.

    scripts/gpu_check.sh [--smoke] [--out DIR] [--fresh] [--budget-s S] [--estimate STAGE=S ...] [STAGE ...]

`scripts/gpu_check.sh` installs the carried wheels first and then runs this file. Stages, in
this order of value, each in its own process:

  parity  the tests marked ``cuda`` in tests/test_liger_backend.py and tests/test_ops_torch_chunked.py
          (Triton/Liger and chunked ops against references: values and gradients, float32 and
          bfloat16, a vocabulary that is not a multiple of the block) with QTUNING_REQUIRE_CUDA=1,
          so that a skipped CUDA test is a failure; counted from pytest's JUnit XML. The test
          needing liger-kernel's cutedsl extra runs only where that extra is installed (the report
          says when it was not).
  step    benchmarks/gpu_step.py at its default shape (a 0.86B-parameter Llama, seq 2048, batch 8,
          bf16, LoRA): full-data SFT with Liger's fused linear cross-entropy (and with our torch op)
          vs Q-Tuning 25% x 50% on our liger and torch backends; then the statistics pass alone
          (N 16384, H 4096, V 128256) against Liger's fused linear cross-entropy forward; and one
          optimizer step at the consumer shape (Llama-3-8B's layers, seq 2048, micro_batch_size 1 x
          gradient accumulation 16, gradient checkpointing): full-data SFT against Q-Tuning's step
          scope with its rows scored 16 to a forward (docs/scoring_memory.md).
  qlora   benchmarks/qlora_memory.py --device cuda at Llama-3-8B shapes, all 32 layers, every arm
          in one process (on CUDA each step's peak is taken above what is allocated when it starts),
          at the micro-batch of examples/llama3-qtuning.yml (read from it) and at 8 rows: peak
          memory of plain QLoRA, fused-loss QLoRA and Q-Tuning 25% x 50%, with the rows Q-Tuning
          kept (bf16 LoRA instead, with the reason, where bitsandbytes cannot run).

--smoke runs the same stages on CPU at toy shapes (parity: the CPU cases of two tests of
tests/test_ops_torch_chunked.py), so that the test suite keeps this command working; its numbers
mean nothing.

The budget: with --budget-s S the run ends within S seconds of --started-at (gpu_check.sh passes
its own start, so that the wheel install counts; default: this process's start). A stage starts
only if its estimated duration (ESTIMATE_S, for the GPU or for the smoke run; --estimate
STAGE=SECONDS overrides) fits in the time left, less REPORT_RESERVE_S kept for writing the report;
else it is skipped and the report says so. A stage still running at that point is killed (its
whole process group) and reported as cut off; the step stage keeps the measurements it finished
(benchmarks/gpu_step.py rewrites its summary after each one). Later stages that fit still run.

The report is OUT/gpu_check.json and OUT/gpu_check.md (rendered from the JSON), OUT being --out,
else $OUT if set, else benchmarks/gpu; both are rewritten (atomically) as soon as each stage ends,
so that a run killed from outside keeps every stage that finished. A run merges into the report
already in OUT, else into benchmarks/gpu/gpu_check.json (so that stages run in separate calls end
up in one report), replacing the stages it runs (a stage skipped for the budget replaces
nothing) and adding itself to the report's list of runs; --fresh starts from nothing, and a smoke
report never merges with a GPU one. Each stage's output also goes to OUT/gpu_check_<stage>.log.
At most 6 files are written (the device tool returns 8). The goals of the issue are evaluated from
the measured numbers and reported, never asserted. Exit status: 1 if a stage run now failed or was
cut off, else 0 (stages skipped for the budget are listed last).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
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
# consumer_step_time: the goal for the CPU consumer shape, applied to the GPU's; no memory goal
# there: the scoring forward may take free memory on purpose (docs/scoring_memory.md).
LIMITS = {"stats_pass": 1.10, "step_time": 0.60, "step_memory": 0.40, "consumer_step_time": 0.55,
          "example_memory_gib": 15.0}
# Estimated seconds per stage, only used to decide whether a stage still fits: on one H100, about
# twice what benchmarks/gpu/README.md ("The time budget") derives from first principles (nothing
# has run there yet); in the smoke run, what it took on this project's 2-core machine under a
# load of 4 to 8, rounded up.
ESTIMATE_S = {"gpu": {"parity": 90, "step": 180, "qlora": 180},
              "smoke": {"parity": 30, "step": 80, "qlora": 150}}
REPORT_RESERVE_S = 5  # kept back from the deadline: killing a stage's processes and writing the report


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


def _kill_group(proc: subprocess.Popen) -> None:
    """End the process group that ``proc`` leads (it and whatever it started): TERM, 5 s, then KILL."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:  # the group is empty
        proc.wait()
        return
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_logged(command: list[str], log: Path, env: Optional[dict] = None,
               kill_at: Optional[float] = None) -> tuple[int, bool]:
    """Run ``command`` from the repository root, its output to this process's stdout and to ``log``.

    The command leads its own process group (in this session); at ``kill_at`` (``time.time()``
    seconds; None: never) the whole group is killed. Whatever it left running is ended when it
    returns. Returns ``(exit status, whether it was cut off at kill_at)``.
    """
    print(f"\n$ {' '.join(command)}", flush=True)
    with log.open("w") as log_file:
        log_file.write(f"$ {' '.join(command)}\n")
        proc = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1, process_group=0)

        def copy_output() -> None:
            for line in proc.stdout:
                sys.stdout.write(line)
                log_file.write(line)

        copier = threading.Thread(target=copy_output, daemon=True)
        copier.start()
        cut_off = False
        try:
            proc.wait(timeout=None if kill_at is None else max(0.0, kill_at - time.time()))
        except subprocess.TimeoutExpired:
            cut_off = True
        finally:
            _kill_group(proc)
        copier.join(timeout=5)
        if cut_off:
            message = f"gpu_check: cut off at the deadline, {time.strftime('%H:%M:%S')}: process group killed"
            print(message, flush=True)
            log_file.write(message + "\n")
    return proc.returncode, cut_off


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
# Each stage runs one command until it ends or ``kill_at`` and returns its part of the report:
# "command", "returncode", "cut_off", "ok" (False also when cut off), "problem" when not ok, and
# what it measured.
def _outcome(result: dict, problem: str) -> dict:
    """``result`` marked failed with ``problem``, said as being cut off at the deadline if it was."""
    if result["cut_off"]:
        problem = "cut off at the deadline (process group killed); " + problem
    return {**result, "ok": False, "problem": problem}


def parity_stage(smoke: bool, out: Path, scratch: Path, env: dict, kill_at: Optional[float]) -> dict:
    junit = out / "gpu_check_parity.xml"
    junit.unlink(missing_ok=True)  # a report left by an earlier run must not count as this one's
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
    returncode, cut_off = run_logged(command, out / "gpu_check_parity.log", {"QTUNING_REQUIRE_CUDA": "1"}, kill_at)
    result = {"command": " ".join(command[1:]), "returncode": returncode, "cut_off": cut_off, "not_run": not_run}
    if cut_off or not junit.exists():
        return _outcome(result, "pytest did not finish (see gpu_check_parity.log)")
    result.update(junit_outcomes(junit))
    counts = result["counts"]
    result["ok"] = returncode == 0 and counts["passed"] > 0 and counts["passed"] == sum(counts.values())
    return result


def step_stage(smoke: bool, out: Path, scratch: Path, env: dict, kill_at: Optional[float]) -> dict:
    summary = scratch / "step.json"
    command = [sys.executable, "benchmarks/gpu_step.py", "--json", str(summary)]
    if smoke:
        command += ["--device", "cpu", "--tiny"]
    returncode, cut_off = run_logged(command, out / "gpu_check_step.log", kill_at=kill_at)
    result = {"command": " ".join(command[1:]), "returncode": returncode, "cut_off": cut_off}
    if summary.exists():  # written after every measurement: partial if the run did not finish
        result["summary"] = json.loads(summary.read_text())
    if returncode != 0 or not result.get("summary", {}).get("complete"):
        done = result.get("summary", {}).get("done", [])
        kept = f"; kept what it finished: {', '.join(done)}" if done else ""
        return _outcome(result, f"benchmarks/gpu_step.py did not finish (see gpu_check_step.log){kept}")
    skipped = [arm for arm, r in result["summary"]["results"].items() if "skipped" in r]
    skipped += [f"stats/{b}" for b, r in result["summary"]["stats_pass"].items() if "skipped" in r]
    result["ok"] = smoke or not skipped  # on the GPU every arm must run
    if skipped and not smoke:
        result["problem"] = f"arms skipped on the GPU: {', '.join(skipped)}"
    return result


def qlora_stage(smoke: bool, out: Path, scratch: Path, env: dict, kill_at: Optional[float]) -> dict:
    example = example_settings()
    batches = sorted({example["micro_batch_size"], COMPARISON_ROWS})
    summary = scratch / "qlora.json"
    command = [sys.executable, "benchmarks/qlora_memory.py", "--full-depth-arms", "full", "full_fused", "qtuning",
               "--batch", *map(str, batches), "--one-process", "--json", str(summary)]
    if smoke:
        command += ["--device", "cpu", "--tiny", "--seq", "32"]
    else:
        command += ["--device", "cuda", "--seq", str(example["sequence_len"])]
    returncode, cut_off = run_logged(command, out / "gpu_check_qlora.log", kill_at=kill_at)
    result = {"command": " ".join(command[1:]), "returncode": returncode, "cut_off": cut_off, "example": example}
    if returncode != 0 or not summary.exists():
        return _outcome(result, "benchmarks/qlora_memory.py did not finish (see gpu_check_qlora.log)")
    return {**result, "summary": json.loads(summary.read_text()), "ok": True}


RUNNERS = {"parity": parity_stage, "step": step_stage, "qlora": qlora_stage}


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

    not_measured = "step stage not run" if "step" not in stages else "not measured: the step stage did not finish"
    stats = (step or {}).get("stats_pass", {}).get("liger", {})
    shape = (step or {}).get("stats_shape")
    goal("stats_pass", "statistics pass (backend liger) / Liger fused linear CE forward, both without grad"
         + (f", N {shape['tokens']}, H {shape['hidden']}, V {shape['vocab']}" if shape else ""),
         stats.get("time_ratio"), "" if "time_ratio" in stats else stats.get("skipped", not_measured))
    base = (step or {}).get("results", {}).get("full/liger", {})
    arm = (step or {}).get("results", {}).get("0.25x0.5/liger", {})
    time_ratio = arm["step_s"] / base["step_s"] if "step_s" in arm and "step_s" in base else None
    missing = "" if time_ratio is not None else base.get("skipped") or arm.get("skipped") or not_measured
    goal("step_time", "Q-Tuning 25% x 50% step (backend liger) / Liger full-data step, time", time_ratio, missing)
    peaks = [r.get("peak_bytes") for r in (arm, base)]
    memory_ratio = peaks[0] / peaks[1] if None not in peaks else None
    goal("step_memory", "the same, peak torch.cuda.max_memory_allocated", memory_ratio,
         missing or ("" if memory_ratio is not None else "no CUDA memory figures on CPU"))

    results = (step or {}).get("results", {})
    name = next((arm for arm in ("consumer/step_0.25x0.5/liger", "consumer/step_0.25x0.5/torch") if arm in results),
                None)
    arm, base = results.get(name, {}), results.get(name.replace("step_0.25x0.5", "full_mbs1"), {}) if name else {}
    time_ratio = arm["step_s"] / base["step_s"] if "step_s" in arm and "step_s" in base else None
    missing = "" if time_ratio is not None else not_measured
    goal("consumer_step_time", f"consumer shape ({name or 'not run'}): Q-Tuning step / full-data SFT at "
         "micro-batch 1, time", time_ratio, missing)

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
    lines += ["", "## Runs", "", "Each run's stages, in order: what happened, the estimate that decided whether to "
              "start it, and its wall time. The budget counts from the start of scripts/gpu_check.sh (the wheel "
              "install included).", "",
              "| run started | budget s | before the stages s | stage | outcome | estimate s | wall s |",
              "|---|---|---|---|---|---|---|"]
    for run in report["runs"]:
        budget = "none" if run["budget_s"] is None else f"{run['budget_s']:.0f}"
        for name, stage in run["stages"].items():
            lines.append(f"| {run['started']} | {budget} | {run['before_stages_s']:.1f} | {name} | "
                         f"{stage['outcome']} | {stage['estimate_s']:.0f} | {_number(stage.get('wall_s'), 1)} |")
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
                  f"{shape['seq']} tokens. Ratios to `{step['baseline']}`."
                  + ("" if step["complete"] else " **Partial: the run did not finish.**"), "",
                  "| arm | step ms | time ratio | peak MiB | memory ratio | loss |", "|---|---|---|---|---|---|"]
        for arm, r in step["results"].items():
            if "skipped" in r:
                lines.append(f"| {arm} | skipped: {r['skipped']} | | | | |")
                continue
            peak = None if r["peak_bytes"] is None else r["peak_bytes"] / MiB
            lines.append(f"| {arm} | {r['step_s'] * 1e3:.1f} | {_number(step['step_time_ratio'].get(arm))} | "
                         f"{_number(peak, 0)} | {_number(step['peak_mem_ratio'].get(arm))} | {r['loss']:.4f} |")
        consumer = {arm: r for arm, r in step["results"].items() if "scoring_forwards" in r}
        for arm, r in consumer.items():
            lines += ["", f"`consumer/...` arms: one optimizer step of 16 rows at micro_batch_size 1, Llama-3-8B's "
                      "layers in bf16, seq 2048, gradient checkpointing (docs/scoring_memory.md); ratios to "
                      f"`consumer/full_mbs1`. `{arm}` scored its rows in {r['scoring_forwards']} forward(s)."]
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
                return {"runs": [], **report}
    return {"mode": mode, "stages": {}, "runs": []}


def write(report: dict, out: Path) -> None:
    """OUT/gpu_check.json and OUT/gpu_check.md, each replaced in one step (a kill never leaves half a file)."""
    report["goals"] = goals(report)
    for name, text in ((REPORT, json.dumps(report, indent=1) + "\n"), (MARKDOWN, markdown(report))):
        partial = out / f".{name}.partial"
        partial.write_text(text)
        os.replace(partial, out / name)


def estimate_arg(text: str) -> tuple[str, float]:
    """``STAGE=SECONDS`` of --estimate."""
    stage, _, seconds = text.partition("=")
    try:
        value = float(seconds)
    except ValueError:
        value = math.nan
    if stage not in STAGES or not value >= 0:
        raise argparse.ArgumentTypeError(f"--estimate {text!r}: want STAGE=SECONDS, STAGE one of "
                                         f"{', '.join(STAGES)} and SECONDS >= 0")
    return stage, value


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stages", nargs="*", metavar="STAGE",
                        help=f"{', '.join(STAGES)} or all (default)")
    parser.add_argument("--smoke", action="store_true", help="on CPU at toy shapes (the test suite's run)")
    parser.add_argument("--out", type=Path, default=None, help="report folder (default: $OUT, else benchmarks/gpu)")
    parser.add_argument("--fresh", action="store_true", help="do not merge into an existing report")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="end the run within this many seconds of --started-at (default: no limit)")
    parser.add_argument("--started-at", type=float, default=None,
                        help="when the budget started, time.time() seconds (default: now; gpu_check.sh passes its "
                             "own start)")
    parser.add_argument("--estimate", type=estimate_arg, action="append", default=[], metavar="STAGE=SECONDS",
                        help="override a stage's estimated duration (defaults: "
                             + "; ".join(f"{mode} {estimates}" for mode, estimates in ESTIMATE_S.items()) + ")")
    args = parser.parse_args(argv)
    unknown = set(args.stages) - {*STAGES, "all"}
    if unknown:
        parser.error(f"unknown stage {', '.join(sorted(unknown))}: choose from {', '.join(STAGES)}, all")
    if args.budget_s is not None and not args.budget_s > REPORT_RESERVE_S:
        parser.error(f"--budget-s {args.budget_s}: want more than {REPORT_RESERVE_S} seconds")
    stages = list(STAGES) if not args.stages or "all" in args.stages else [s for s in STAGES if s in args.stages]
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else DEFAULT_OUT)
    out.mkdir(parents=True, exist_ok=True)
    mode = "smoke" if args.smoke else "gpu"
    estimates = {**ESTIMATE_S[mode], **dict(args.estimate)}
    started_at = args.started_at if args.started_at is not None else time.time()
    # Stages are killed REPORT_RESERVE_S before the deadline, so that the report is written within it.
    kill_at = None if args.budget_s is None else started_at + args.budget_s - REPORT_RESERVE_S

    report = {"mode": mode, "stages": {}, "runs": []} if args.fresh else load_previous(out, mode)
    env = environment(args.smoke)
    if not args.smoke and "name" not in (env["gpu"] or {}):
        print(f"gpu_check needs an NVIDIA GPU ({env['gpu']}); `--smoke` runs it on CPU at toy shapes.")
        return 1
    run = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started_at)), "budget_s": args.budget_s,
           "before_stages_s": time.time() - started_at, "stages": {}}
    report["runs"].append(run)
    failed, skipped = [], []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        for name in stages:
            left = math.inf if kill_at is None else kill_at - time.time()
            if estimates[name] > left:
                why = (f"skipped: estimated {estimates[name]:.0f} s, {max(left, 0):.0f} s left of the "
                       f"{args.budget_s:.0f} s budget")
                print(f"\n=== gpu_check stage {name} ({mode}) {why}", flush=True)
                run["stages"][name] = {"outcome": why, "estimate_s": estimates[name]}
                skipped.append(name)
                write(report, out)
                continue
            print(f"\n=== gpu_check stage {name} ({mode}), estimated {estimates[name]:.0f} s, "
                  f"{'no limit' if kill_at is None else f'{left:.0f} s left'}", flush=True)
            start = time.perf_counter()
            result = RUNNERS[name](args.smoke, out, Path(scratch), env, kill_at)
            result["wall_s"] = time.perf_counter() - start
            result["environment"] = {**env, "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
            report["stages"][name] = result
            outcome = "ok" if result["ok"] else ("cut off" if result["cut_off"] else "failed")
            run["stages"][name] = {"outcome": outcome, "estimate_s": estimates[name], "wall_s": result["wall_s"]}
            write(report, out)
            if not result["ok"]:
                failed.append(name)
    print("\n" + (out / MARKDOWN).read_text())
    print(f"report: {out / REPORT}, {out / MARKDOWN}" + (f"; failed stages: {', '.join(failed)}" if failed else "")
          + (f"; stages skipped for the budget: {', '.join(skipped)}" if skipped else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    # A kill from outside (the device tool's timeout) also ends the running stage (run_logged's finally).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    sys.exit(main())

"""The GPU check (`scripts/gpu_check.sh`, `benchmarks/gpu_check.py`) on CPU, so that it cannot rot.

* its smoke run (toy shapes, all three stages) writes a report whose structure is complete, whose
  numbers are finite and whose ratios are those of the measured numbers, in files the device tool
  brings back;
* the time budget: a stage whose estimate does not fit is skipped and reported, later stages that
  fit still run; a stage running at the deadline is killed with everything it started and reported
  as cut off, within the budget; each stage's report is on disk before the next stage starts; the
  step benchmark keeps the measurements it finished;
* ``QTUNING_REQUIRE_CUDA=1`` turns a skipped CUDA test into a failure, counted as such from JUnit XML;
* the QLoRA stage falls back to bf16 LoRA, saying why, where bitsandbytes cannot run.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = pytest.mark.env_independent  # the GPU check's tooling, exercised on CPU: `make test` only

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHON": sys.executable}


def _module(name: str):
    """``benchmarks/<name>.py``, imported afresh."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _gpu_check_module():
    return _module("gpu_check")


def _numbers(value):
    """Every int and float inside a JSON value."""
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in _numbers(v)]
    return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


def _run_check(*args, out: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "scripts/gpu_check.sh", "--smoke", "--out", str(out), "--fresh", *args],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def test_smoke_run_writes_a_complete_report(tmp_path):
    proc = _run_check("--budget-s", "3000", out=tmp_path)  # every stage fits
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["mode"] == "smoke" and set(report["stages"]) == {"parity", "step", "qlora"}
    assert all(math.isfinite(n) for n in _numbers(report))
    # What the device tool brings back from $OUT: at most 8 files, named in letters, digits, '.', '_', '-'.
    files = sorted(path.name for path in tmp_path.iterdir())
    assert len(files) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", name) for name in files), files
    (run,) = report["runs"]
    assert run["budget_s"] == 3000 and 0 <= run["before_stages_s"] < 60
    estimates = _gpu_check_module().ESTIMATE_S["smoke"]
    assert {name: (stage["outcome"], stage["estimate_s"]) for name, stage in run["stages"].items()} == {
        name: ("ok", estimates[name]) for name in ("parity", "step", "qlora")}
    for name, stage in report["stages"].items():
        assert stage["ok"] and stage["returncode"] == 0 and stage["wall_s"] > 0
        assert stage["environment"]["packages"]["torch"] == importlib.metadata.version("torch")
        assert (tmp_path / f"gpu_check_{name}.log").stat().st_size > 0

    parity = report["stages"]["parity"]  # two CPU tests x 3 reductions
    assert parity["counts"] == {"passed": 6, "failed": 0, "errors": 0, "skipped": 0}

    step = report["stages"]["step"]["summary"]
    assert step["baseline"] == "full/torch"  # liger needs CUDA (or the Triton interpreter)
    consumer = ["consumer/full_mbs1/torch", "consumer/step_0.25x0.5/torch"]
    assert step["complete"] and step["done"] == ["full/torch", "0.25x0.5/torch", *consumer, "stats/torch"]
    measured = {arm: r for arm, r in step["results"].items() if "skipped" not in r}
    assert set(measured) == {"full/torch", "0.25x0.5/torch", *consumer}
    for arm, result in measured.items():
        base = measured[consumer[0] if arm in consumer else "full/torch"]["step_s"]
        assert result["step_s"] > 0
        assert step["step_time_ratio"][arm] == pytest.approx(result["step_s"] / base, abs=5.1e-4)
    # The tiny consumer shape's 16 rows of 32 positions, scored 16 rows to a forward: one forward.
    assert measured[consumer[1]]["scoring_forwards"] == 1
    stats = step["stats_pass"]["torch"]
    assert stats["time_ratio"] == pytest.approx(stats["stats_s"] / stats["loss_forward_s"], abs=5.1e-4)
    assert "skipped" in step["stats_pass"]["liger"]

    qlora = report["stages"]["qlora"]
    example = yaml.safe_load((ROOT / "examples" / "llama3-qtuning.yml").read_text())
    assert qlora["example"]["micro_batch_size"] == example["micro_batch_size"]
    assert qlora["example"]["gradient_accumulation_steps"] == example["gradient_accumulation_steps"]
    summary = qlora["summary"]
    assert summary["batches"] == sorted({example["micro_batch_size"], 8}) and summary["quantization"] == "nf4"
    depth = str(summary["depth"])
    for batch in map(str, summary["batches"]):
        arms = summary["full_depth"][batch]
        assert set(arms) == {"full", "full_fused", "qtuning"}
        raw = {arm: summary["measured"][arm][depth]["by_batch"][batch] for arm in arms}
        # The plain arm's loss upcasts the [B, T, V] logits to float32, a fresh mapping on CPU where it
        # is at least glibc's mmap threshold that qlora_memory.py sets (128 KiB), so its step peak is at
        # least that; the fused arms' peaks at toy shapes can round to 0.000 GiB.
        logits_bytes = int(batch) * summary["seq"] * _module("qlora_memory").TINY["vocab_size"] * 4
        if logits_bytes >= 131072:
            assert raw["full"]["step_peak_bytes"] >= logits_bytes
        for arm, values in arms.items():
            assert values["model_gib"] > 0 and raw[arm]["step_peak_bytes"] >= 0 and values["how"] == "measured"
            expected = raw[arm]["step_peak_bytes"] / raw["full"]["step_peak_bytes"]
            assert values["step_ratio_to_full"] == pytest.approx(expected, abs=5.1e-4)
        scoring = [phase for phase in raw["qtuning"]["phases"] if "kept_rows" in phase]
        assert len(scoring) == 1 and arms["qtuning"]["kept_rows"] == scoring[0]["kept_rows"]
        assert 1 <= arms["qtuning"]["kept_rows"] <= int(batch) == arms["qtuning"]["rows"]

    goals = {row["goal"]: row for row in report["goals"]}
    assert set(goals) == {"stats_pass", "step_time", "step_memory", "consumer_step_time", "example_memory_gib"}
    assert goals["consumer_step_time"]["value"] == pytest.approx(step["step_time_ratio"][consumer[1]], abs=5.1e-4)
    assert all(row["met"] is None for row in goals.values())  # a smoke run judges nothing
    assert goals["stats_pass"]["value"] is None and goals["step_time"]["value"] is None  # liger did not run
    at_example = summary["full_depth"][str(example["micro_batch_size"])]
    assert goals["example_memory_gib"]["value"] == max(at_example["qtuning"]["total_gib"],
                                                       at_example["full_fused"]["total_gib"])

    markdown = (tmp_path / "gpu_check.md").read_text()
    assert markdown == _gpu_check_module().markdown(report)
    for heading in ("Smoke run", "## Goals", "## Runs", "## Parity tests", "## Step time", "## QLoRA memory"):
        assert heading in markdown


# ------------------------------------------------------------------------------ the time budget
def test_smoke_run_skips_a_stage_whose_estimate_does_not_fit(tmp_path):
    proc = _run_check("--budget-s", "600", "--estimate", "step=100000", "parity", "step", out=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(report["stages"]) == {"parity"} and report["stages"]["parity"]["ok"]
    assert not (tmp_path / "gpu_check_step.log").exists()  # never started
    outcome = report["runs"][0]["stages"]["step"]["outcome"]
    assert re.fullmatch(r"skipped: estimated 100000 s, \d+ s left of the 600 s budget", outcome), outcome
    assert f"| step | {outcome} | 100000 |" in (tmp_path / "gpu_check.md").read_text()
    assert proc.stdout.strip().splitlines()[-1].endswith("; stages skipped for the budget: step")


def _fake_stage(name: str, log: list, **result):
    """A stage runner that records the report on disk when it starts, in ``log``, and returns ``result``."""

    def runner(smoke, out, scratch, env, kill_at):
        on_disk = out / "gpu_check.json"
        stages = sorted(json.loads(on_disk.read_text())["stages"]) if on_disk.exists() else None
        markdown = (out / "gpu_check.md").read_text() if (out / "gpu_check.md").exists() else ""
        log.append({"stage": name, "stages_on_disk": stages, "markdown": markdown, "kill_at": kill_at})
        return {"command": f"fake {name}", "returncode": 0, "cut_off": False, "ok": True, "not_run": {}, **result}

    return runner


def test_each_stage_is_in_the_report_on_disk_before_the_next_starts(tmp_path, monkeypatch):
    gpu_check = _gpu_check_module()
    started = []
    for name in gpu_check.STAGES:
        monkeypatch.setitem(gpu_check.RUNNERS, name, _fake_stage(name, started))
    assert gpu_check.main(["--smoke", "--out", str(tmp_path), "--fresh"]) == 0
    assert [(s["stage"], s["stages_on_disk"]) for s in started] == [
        ("parity", None), ("step", ["parity"]), ("qlora", ["parity", "step"])]
    assert "| parity | ok |" in started[1]["markdown"] and "| step | ok |" in started[2]["markdown"]
    assert all(s["kill_at"] is None for s in started)  # no budget, no deadline


def test_a_stage_that_does_not_fit_is_skipped_and_later_ones_that_fit_run(tmp_path, monkeypatch, capsys):
    gpu_check = _gpu_check_module()
    started = []
    monkeypatch.setitem(gpu_check.RUNNERS, "step", _fake_stage("step", started, first_run=True))
    assert gpu_check.main(["--smoke", "--out", str(tmp_path), "--fresh", "step"]) == 0
    for name in gpu_check.STAGES:
        monkeypatch.setitem(gpu_check.RUNNERS, name, _fake_stage(name, started))
    started.clear()
    budget, reserve = 100, gpu_check.REPORT_RESERVE_S
    # step would fit the budget but not the budget less the time kept for writing the report
    estimates = {"parity": 0, "step": budget - reserve + 2, "qlora": budget - reserve - 10}
    before = time.time()
    status = gpu_check.main(["--smoke", "--out", str(tmp_path), "--budget-s", str(budget), "--started-at", str(before),
                             *[f"--estimate={name}={seconds}" for name, seconds in estimates.items()]])
    assert status == 0
    assert [s["stage"] for s in started] == ["parity", "qlora"]
    assert all(s["kill_at"] == pytest.approx(before + budget - reserve) for s in started)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["stages"]["step"]["first_run"]  # a stage skipped for the budget replaces nothing
    assert len(report["runs"]) == 2
    outcomes = {name: stage["outcome"] for name, stage in report["runs"][1]["stages"].items()}
    assert outcomes["parity"] == outcomes["qlora"] == "ok"
    assert re.fullmatch(rf"skipped: estimated {budget - reserve + 2} s, 9[45] s left of the {budget} s budget",
                        outcomes["step"]), outcomes
    assert outcomes["step"] in (tmp_path / "gpu_check.md").read_text()
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith("; stages skipped for the budget: step")


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (dead, not yet reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_stage_running_at_the_deadline_is_cut_off_with_what_it_started(tmp_path, monkeypatch):
    gpu_check = _gpu_check_module()
    pid_file = tmp_path / "grandchild.pid"
    slow = tmp_path / "slow_stage.py"  # starts a grandchild that writes its pid, then both sleep
    slow.write_text("import os, subprocess, sys, time\n"
                    "if sys.argv[1:] == ['grandchild']:\n"
                    f"    open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
                    "else:\n"
                    "    subprocess.Popen([sys.executable, __file__, 'grandchild'])\n"
                    "    print('stage started', flush=True)\n"
                    "time.sleep(120)\n")

    def slow_stage(smoke, out, scratch, env, kill_at):
        returncode, cut_off = gpu_check.run_logged([sys.executable, str(slow)], out / "gpu_check_parity.log",
                                                   kill_at=kill_at)
        result = {"command": "slow", "returncode": returncode, "cut_off": cut_off, "not_run": {}}
        return gpu_check._outcome(result, "it did not finish") if cut_off else {**result, "ok": returncode == 0}

    started = []
    monkeypatch.setitem(gpu_check.RUNNERS, "parity", slow_stage)
    monkeypatch.setitem(gpu_check.RUNNERS, "step", _fake_stage("step", started))
    budget = 9  # the stage is killed REPORT_RESERVE_S before: 4 s in
    before = time.time()
    status = gpu_check.main(["--smoke", "--out", str(tmp_path), "--fresh", "--budget-s", str(budget),
                             "--started-at", str(before), "--estimate", "parity=0", "--estimate", "step=0",
                             "parity", "step"])
    elapsed = time.time() - before
    assert status == 1 and elapsed < budget, elapsed
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    parity = report["stages"]["parity"]
    assert parity["cut_off"] and not parity["ok"] and parity["returncode"] < 0
    assert parity["problem"].startswith("cut off at the deadline")
    log = (tmp_path / "gpu_check_parity.log").read_text()
    assert "stage started" in log and "cut off at the deadline" in log
    assert not _running(int(pid_file.read_text()))  # killed with the stage, not left running
    outcomes = {name: stage["outcome"] for name, stage in report["runs"][0]["stages"].items()}
    assert outcomes["parity"] == "cut off" and outcomes["step"].startswith("skipped: estimated 0 s, 0 s left")
    assert started == []  # no time was left for it


def test_step_benchmark_keeps_the_measurements_it_finished(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # as `python benchmarks/gpu_step.py` has it
    gpu_step = _module("gpu_step")

    def killed(*args, **kwargs):
        raise RuntimeError("planted: the run ends before the statistics pass")

    monkeypatch.setattr(gpu_step, "stats_pass", killed)
    summary = tmp_path / "step.json"
    with pytest.raises(RuntimeError, match="planted"):
        gpu_step.main(["--device", "cpu", "--tiny", "--layers", "1", "--seq", "16", "--vocab", "97",
                       "--json", str(summary)])
    partial = json.loads(summary.read_text())
    assert not partial["complete"] and partial["done"] == [
        "full/torch", "0.25x0.5/torch", "consumer/full_mbs1/torch", "consumer/step_0.25x0.5/torch"]
    results = partial["results"]
    assert partial["baseline"] == "full/torch" and partial["step_time_ratio"]["0.25x0.5/torch"] == pytest.approx(
        results["0.25x0.5/torch"]["step_s"] / results["full/torch"]["step_s"], abs=5.1e-4)
    # the consumer arms are ratios to full-data SFT at their own shape
    assert partial["step_time_ratio"]["consumer/step_0.25x0.5/torch"] == pytest.approx(
        results["consumer/step_0.25x0.5/torch"]["step_s"] / results["consumer/full_mbs1/torch"]["step_s"], abs=5.1e-4)
    assert set(partial["stats_pass"]) == {"liger"} and "skipped" in partial["stats_pass"]["liger"]

    gpu_check = _gpu_check_module()  # the check reports such a summary as a partial stage
    stage = {"command": "gpu_step", "returncode": -15, "cut_off": True, "ok": False, "problem": "cut off",
             "summary": partial, "wall_s": 1.0, "environment": {**gpu_check.environment(True), "finished": "now"}}
    report = {"mode": "smoke", "stages": {"step": stage}, "runs": []}
    report["goals"] = gpu_check.goals(report)
    markdown = gpu_check.markdown(report)
    assert "**Partial: the run did not finish.**" in markdown and "| 0.25x0.5/torch |" in markdown


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens to CUDA tests on a machine without CUDA")
def test_require_cuda_turns_a_skipped_cuda_test_into_a_failure(tmp_path):
    junit_outcomes = _gpu_check_module().junit_outcomes
    outcomes = {}
    for required in ("0", "1"):
        junit = tmp_path / f"required-{required}.xml"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
                   "tests/test_ops_torch_chunked.py::test_token_stats_records_no_graph"]
        proc = subprocess.run(command, cwd=ROOT, env={**ENV, "QTUNING_REQUIRE_CUDA": required},
                              capture_output=True, text=True, timeout=300)
        outcomes[required] = (proc.returncode, junit_outcomes(junit))
    assert outcomes["0"][0] == 0
    assert outcomes["0"][1]["counts"] == {"passed": 1, "failed": 0, "errors": 0, "skipped": 1}
    returncode, required = outcomes["1"]
    assert returncode == 1
    assert required["counts"] == {"passed": 1, "failed": 0, "errors": 1, "skipped": 0}
    (case,) = required["not_passed"]
    assert case["test"].endswith("test_token_stats_records_no_graph[cuda]")
    assert "QTUNING_REQUIRE_CUDA=1: this CUDA test must run here, but it skipped" in case["message"]


def test_qlora_stage_falls_back_to_bf16_lora_without_bitsandbytes(tmp_path):
    broken = tmp_path / "site" / "bitsandbytes"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('planted: this bitsandbytes cannot load')\n")
    summary = tmp_path / "qlora.json"
    command = [sys.executable, "benchmarks/qlora_memory.py", "--tiny", "--arms", "full_fused", "--full-depth-arms",
               "full_fused", "--batch", "2", "--seq", "16", "--json", str(summary)]
    python_path = os.pathsep.join([str(broken.parent), *filter(None, [os.environ.get("PYTHONPATH")])])
    proc = subprocess.run(command, cwd=ROOT, env={**ENV, "PYTHONPATH": python_path}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    result = json.loads(summary.read_text())
    assert result["quantization"] == "none"
    assert "ImportError: planted: this bitsandbytes cannot load" in result["nf4_problem"]
    fused = result["full_depth"]["2"]["full_fused"]
    assert fused["how"] == "measured" and fused["step_peak_gib"] > 0 and math.isfinite(fused["step_peak_gib"])
    assert "bf16 LoRA instead of QLoRA: bitsandbytes NF4 on cpu failed" in proc.stdout

"""The GPU check (`scripts/gpu_check.sh`, `benchmarks/gpu_check.py`) on CPU, so that it cannot rot.

* its smoke run (toy shapes, all three stages) writes a report whose structure is complete, whose
  numbers are finite and whose ratios are those of the measured numbers;
* ``QTUNING_REQUIRE_CUDA=1`` turns a skipped CUDA test into a failure, counted as such from JUnit XML;
* the QLoRA stage falls back to bf16 LoRA, saying why, where bitsandbytes cannot run.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHON": sys.executable}


def _gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _numbers(value):
    """Every int and float inside a JSON value."""
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in _numbers(v)]
    return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


def test_smoke_run_writes_a_complete_report(tmp_path):
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--smoke", "--out", str(tmp_path), "--fresh"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["mode"] == "smoke" and set(report["stages"]) == {"parity", "step", "qlora"}
    assert all(math.isfinite(n) for n in _numbers(report))
    for name, stage in report["stages"].items():
        assert stage["ok"] and stage["returncode"] == 0 and stage["wall_s"] > 0
        assert stage["environment"]["packages"]["torch"] == importlib.metadata.version("torch")
        assert (tmp_path / f"gpu_check_{name}.log").stat().st_size > 0

    parity = report["stages"]["parity"]  # two CPU tests x 3 reductions
    assert parity["counts"] == {"passed": 6, "failed": 0, "errors": 0, "skipped": 0}

    step = report["stages"]["step"]["summary"]
    assert step["baseline"] == "full/torch"  # liger needs CUDA (or the Triton interpreter)
    measured = {arm: r for arm, r in step["results"].items() if "skipped" not in r}
    assert set(measured) == {"full/torch", "0.25x0.5/torch", "0.125x0.5/torch", "0.5x0.7/torch"}
    base = measured["full/torch"]["step_s"]
    for arm, result in measured.items():
        assert result["step_s"] > 0
        assert step["step_time_ratio"][arm] == pytest.approx(result["step_s"] / base, abs=5.1e-4)
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
        for arm, values in arms.items():
            assert values["model_gib"] > 0 and values["step_peak_gib"] > 0 and values["how"] == "measured"
            expected = raw[arm]["step_peak_bytes"] / raw["full"]["step_peak_bytes"]
            assert values["step_ratio_to_full"] == pytest.approx(expected, abs=5.1e-4)
        scoring = [phase for phase in raw["qtuning"]["phases"] if "kept_rows" in phase]
        assert len(scoring) == 1 and arms["qtuning"]["kept_rows"] == scoring[0]["kept_rows"]
        assert 1 <= arms["qtuning"]["kept_rows"] <= int(batch) == arms["qtuning"]["rows"]

    goals = {row["goal"]: row for row in report["goals"]}
    assert set(goals) == {"stats_pass", "step_time", "step_memory", "example_memory_gib"}
    assert all(row["met"] is None for row in goals.values())  # a smoke run judges nothing
    assert goals["stats_pass"]["value"] is None and goals["step_time"]["value"] is None  # liger did not run
    at_example = summary["full_depth"][str(example["micro_batch_size"])]
    assert goals["example_memory_gib"]["value"] == max(at_example["qtuning"]["total_gib"],
                                                       at_example["full_fused"]["total_gib"])

    markdown = (tmp_path / "gpu_check.md").read_text()
    assert markdown == _gpu_check_module().markdown(report)
    for heading in ("Smoke run", "## Goals", "## Parity tests", "## Step time", "## QLoRA memory"):
        assert heading in markdown


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

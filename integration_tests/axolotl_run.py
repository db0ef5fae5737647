"""Helpers for the integration tests: real `axolotl train` runs in a subprocess, offline.

(Not a conftest.py: `tests/` imports its own `conftest` by name, and a second
module of that name here would shadow it when both folders are collected.)

Each run gets a config derived from an example (``examples/tiny-cpu-qtuning.yml``
or ``examples/smollm2-135m-qtuning.yml``: base model, output and dataset-cache
folders pointed into pytest's tmp dir, the shipped datasets by absolute path,
fewer steps) and runs ``python -m axolotl.cli.main train CONFIG`` with the
current interpreter, from the tmp dir, with the hub and telemetry off.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
EXAMPLES = REPO / "examples"

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "AXOLOTL_DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_MODE": "disabled",
    "CUDA_VISIBLE_DEVICES": "",  # CPU even where a GPU exists: the example is a CPU config
    "PYTHONUNBUFFERED": "1",
}


def deep_update(base: dict, overrides: dict) -> dict:
    """``base`` with ``overrides`` merged in; nested dicts merge, a None value deletes the key."""
    out = dict(base)
    for key, value in overrides.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_update(out[key], value)
        else:
            out[key] = value
    return out


def example_config(example: str, workdir: Path, base_model: Any, *, steps: int = 10, **overrides: Any) -> Path:
    """Write a config derived from ``examples/EXAMPLE`` into ``workdir``; return its path.

    ``steps`` sets max_steps, and save/eval at the last step, so that
    ``output_dir/checkpoint-<steps>/trainer_state.json`` holds the whole log.
    """
    from qtuning_plugin.example_files import localise

    cfg = yaml.safe_load(localise((EXAMPLES / example).read_text(encoding="utf-8"), workdir))
    cfg["base_model"] = str(base_model)
    cfg["output_dir"] = str(workdir / "out")
    cfg["dataset_prepared_path"] = str(workdir / "prepared")
    cfg.update(max_steps=steps, save_steps=steps, eval_steps=steps)
    cfg = deep_update(cfg, overrides)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "config.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def tiny_config(workdir: Path, base_model: Any, *, steps: int = 10, **overrides: Any) -> Path:
    """A config derived from the tiny CPU example (see `example_config`)."""
    return example_config("tiny-cpu-qtuning.yml", workdir, base_model, steps=steps, **overrides)


@dataclass
class Run:
    returncode: int
    output: str  # stdout and stderr, interleaved
    output_dir: Path
    seconds: float

    def tail(self, lines: int = 80) -> str:
        return "\n".join(self.output.splitlines()[-lines:])

    def trainer_state(self) -> dict:
        """The last checkpoint's trainer_state.json (Axolotl writes none into output_dir itself)."""
        states = sorted(
            self.output_dir.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[1])
        )
        assert states, f"no checkpoint-*/trainer_state.json under {self.output_dir}:\n{self.tail()}"
        return json.loads(states[-1].read_text(encoding="utf-8"))

    def train_logs(self) -> list[dict]:
        """The log_history entries of training steps (those with a training ``loss``)."""
        return [entry for entry in self.trainer_state()["log_history"] if "loss" in entry]

    def probe(self, rank: Optional[int] = None) -> dict:
        """What `qtuning_probe.ProbePlugin` recorded (``rank``: that process's record, in a multi-process run)."""
        name = "qtuning_probe.json" if rank is None else f"qtuning_probe.rank{rank}.json"
        return json.loads((self.output_dir / name).read_text(encoding="utf-8"))


def run_axolotl_train(
    config: Path, *, timeout: float = 600, extra_env: Optional[dict] = None, cli_args: Sequence[str] = ()
) -> Run:
    """``axolotl train CONFIG [CLI_ARGS]`` in a subprocess, from the config's folder."""
    env = {**os.environ, **OFFLINE_ENV, **(extra_env or {})}
    # `axolotl train` execs `accelerate launch ...`, found on PATH: use the one next to this interpreter
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    # the probe plugin (qtuning_probe.ProbePlugin) lives next to this file
    # This folder (the probe plugin) and tests/ (reference.py, which the probe records for)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), str(HERE.parent / "tests"), env.get("PYTHONPATH")]))
    cfg = yaml.safe_load(config.read_text(encoding="utf-8"))
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "axolotl.cli.main", "train", str(config), *cli_args],
        cwd=config.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    seconds = time.monotonic() - start
    (config.parent / "axolotl.log").write_text(proc.stdout, encoding="utf-8")
    return Run(proc.returncode, proc.stdout, Path(cfg["output_dir"]), seconds)


def qtuning_logs(trainer_state: dict) -> dict[int, dict]:
    """The ``qtuning/`` metrics of each logged training step of a ``trainer_state.json``, by step."""
    return {
        entry["step"]: {key: value for key, value in entry.items() if key.startswith("qtuning/")}
        for entry in trainer_state["log_history"]
        if "loss" in entry
    }


def check_same_qtuning_metrics(expected_state: dict, got_state: dict, steps: int) -> None:
    """Both trainer states log steps 1..``steps``, each with the same ``qtuning/`` metrics (to float32 noise)."""
    import pytest

    expected, got = qtuning_logs(expected_state), qtuning_logs(got_state)
    assert sorted(got) == sorted(expected) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert expected[step] and expected[step].keys() == got[step].keys(), step
        for key, value in expected[step].items():
            assert got[step][key] == pytest.approx(value, rel=1e-5, abs=1e-8), (step, key)

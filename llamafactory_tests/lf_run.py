"""Helpers for the LLaMA-Factory tests: real ``qtuning-llamafactory`` / ``llamafactory-cli`` runs in a
subprocess, offline, on the tiny model.

Each run's config is LLaMA-Factory 0.9.5's own LoRA SFT example (``qwen3_lora_sft.yaml`` here, a
copy of its ``examples/train_lora/qwen3_lora_sft.yaml``) with what a CPU test must change: our
tiny Llama and its ChatML tokenizer (the example's ``qwen3_nothink`` template is ChatML, so it
stays), the shipped dataset registered in a ``dataset_info.json``, fp32, a few steps, and the
output in pytest's tmp dir. (Not a conftest.py: ``tests/`` imports its own ``conftest`` by name.)
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
sys.path.insert(0, str(HERE.parent / "integration_tests"))
from axolotl_run import Run as AxolotlRun  # noqa: E402  (imports no Axolotl)

EXAMPLE = HERE / "qwen3_lora_sft.yaml"
PROBE = HERE / "probe"
DATASET = "tiny_instruct"
BIN = Path(sys.executable).parent

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_MODE": "disabled",
    "CUDA_VISIBLE_DEVICES": "",
    "PYTHONUNBUFFERED": "1",
    "OMP_NUM_THREADS": "1",
}

# What the CPU test changes in the example, besides paths.
CPU_SETTINGS = {
    "bf16": False,
    "cutoff_len": 256,
    "max_samples": None,
    "preprocessing_num_workers": None,
    "dataloader_num_workers": 0,
    "logging_steps": 1,
    "learning_rate": 5.0e-3,
    "report_to": "none",
}


def dataset_dir(workdir: Path) -> Path:
    """A ``dataset_info.json`` registering the shipped chat rows as ``tiny_instruct`` (sharegpt format)."""
    from qtuning_plugin.tiny import dataset_path

    folder = workdir / "data"
    folder.mkdir(parents=True, exist_ok=True)
    info = {
        DATASET: {
            "file_name": str(dataset_path()),
            "formatting": "sharegpt",
            "columns": {"messages": "messages"},
            "tags": {
                "role_tag": "role",
                "content_tag": "content",
                "user_tag": "user",
                "assistant_tag": "assistant",
                "system_tag": "system",
            },
        }
    }
    (folder / "dataset_info.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
    return folder


def example_config(workdir: Path, model: Path, *, steps: int, **overrides: Any) -> Path:
    """Write the example, set up for ``model`` on CPU for ``steps`` optimizer steps, into ``workdir``.

    ``overrides`` replace top-level keys; a None value removes the key.
    """
    cfg = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    cfg.update(CPU_SETTINGS)
    cfg.update(
        model_name_or_path=str(model),
        dataset=DATASET,
        dataset_dir=str(dataset_dir(workdir)),
        output_dir=str(workdir / "out"),
        max_steps=steps,
        save_steps=steps,
    )
    cfg.update(overrides)
    cfg = {key: value for key, value in cfg.items() if value is not None}
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


@dataclass
class Run(AxolotlRun):
    """A finished run (``tail``, ``train_logs`` as for the Axolotl runs) and the folder of its probe."""

    probe_dir: Path

    def trainer_state(self) -> dict:
        """``output_dir/trainer_state.json`` (LLaMA-Factory's ``run_sft`` saves the state at the end)."""
        path = self.output_dir / "trainer_state.json"
        assert path.is_file(), f"no {path}:\n{self.tail()}"
        return json.loads(path.read_text(encoding="utf-8"))

    def trainer_log(self) -> list[dict]:
        """LlamaBoard's ``trainer_log.jsonl``, one dict per line."""
        lines = (self.output_dir / "trainer_log.jsonl").read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines]

    def selections(self, rank: int = 0) -> list[dict]:
        """What ``probe/sitecustomize.py`` recorded on ``rank``: one dict per selection."""
        lines = (self.probe_dir / f"selections.rank{rank}.jsonl").read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines]


def run(
    command: Sequence[str],
    workdir: Path,
    *,
    probe: bool = False,
    extra_env: Optional[dict] = None,
    timeout: float = 900,
) -> Run:
    """``command`` (its first word a console script of this environment) in a subprocess, from ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    probe_dir = workdir / "probe"
    env = {**os.environ, **OFFLINE_ENV, "HF_DATASETS_CACHE": str(workdir / "datasets-cache"), **(extra_env or {})}
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])
    if probe:
        probe_dir.mkdir(exist_ok=True)
        env["QTUNING_PROBE_DIR"] = str(probe_dir)
        # the probe (sitecustomize.py) and tests/ (reference.py, which the probe records for)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROBE), str(HERE.parent / "tests"), env.get("PYTHONPATH")]))
    start = time.monotonic()
    proc = subprocess.run(
        [str(BIN / command[0]), *command[1:]],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    seconds = time.monotonic() - start
    (workdir / "run.log").write_text(proc.stdout, encoding="utf-8")
    config = workdir / "config.yaml"
    output_dir = Path(yaml.safe_load(config.read_text())["output_dir"]) if config.is_file() else workdir / "out"
    return Run(proc.returncode, proc.stdout, output_dir, seconds, probe_dir)


def check_finished(run: Run) -> None:
    """The run exited 0 and saved the adapter."""
    assert run.returncode == 0, f"training failed ({run.returncode}):\n{run.tail()}"
    assert (run.output_dir / "adapter_model.safetensors").is_file(), sorted(p.name for p in run.output_dir.iterdir())

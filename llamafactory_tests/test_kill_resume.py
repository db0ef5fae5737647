"""``qtuning-llamafactory train`` killed with SIGKILL and resumed finishes as the uninterrupted run,
and a checkpoint whose Q-Tuning state is cut short stops the resume with the plugin's message
(about 50 seconds on 2 cores: 4 runs of the tiny model).

A run that saves every step is killed at its third triage (``QTUNING_KILL_AT_SELECTION``, the
probe in ``probe/sitecustomize.py``: after step 3's scoring pass, before its training pass) and
resumed from its newest checkpoint in the same output folder; its Q-Tuning metrics must equal the
uninterrupted run's at every step, and so must its decision log (``log_decisions``), and every
``qtuning_state.json`` it left must be whole, as must the lines of LlamaBoard's ``trainer_log.jsonl``.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from lf_run import check_finished, example_config, run

from axolotl_run import check_same_qtuning_metrics  # noqa: E402  (integration_tests/, put on sys.path by lf_run)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference import check_same_decisions  # noqa: E402

STEPS = 4
KILL_AT = 3
SETTINGS = dict(
    steps=STEPS, save_steps=1, qtuning={"sample_keep_ratio": 0.5, "token_keep_ratio": 0.5, "log_decisions": True}
)


def test_a_killed_run_resumes_to_the_uninterrupted_metrics(tiny_model, tmp_path):
    from qtuning_plugin.atomic_files import read_jsonl
    from qtuning_plugin.decisions import DECISIONS_NAME
    from qtuning_plugin.history import STATE_NAME, QTuningHistory

    full = run(["qtuning-llamafactory", "train", str(example_config(tmp_path / "full", tiny_model, **SETTINGS))],
               tmp_path / "full")
    check_finished(full)

    workdir = tmp_path / "killed"
    config = example_config(workdir, tiny_model, **SETTINGS)
    killed = run(["qtuning-llamafactory", "train", str(config)], workdir, probe=True,
                 extra_env={"QTUNING_KILL_AT_SELECTION": str(KILL_AT)})
    assert killed.returncode == -9, killed.tail()
    checkpoints = sorted(killed.output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert [p.name for p in checkpoints] == [f"checkpoint-{step}" for step in range(1, KILL_AT)]
    for checkpoint in checkpoints:
        assert QTuningHistory().load(str(checkpoint))
    logged = [line["current_steps"] for line in read_jsonl(str(killed.output_dir / "trainer_log.jsonl"))]
    assert logged and logged == list(range(1, len(logged) + 1)), logged  # written by a worker thread
    # Step 3 was triaged (and logged) before the kill; the resume from checkpoint-2 drops its lines.
    assert {line["step"] for line in read_jsonl(str(killed.output_dir / DECISIONS_NAME))} == set(range(1, KILL_AT + 1))

    newest = checkpoints[-1]
    config = example_config(workdir, tiny_model, resume_from_checkpoint=str(newest), **SETTINGS)
    resumed = run(["qtuning-llamafactory", "train", str(config)], workdir)
    check_finished(resumed)
    check_same_qtuning_metrics(full.trainer_state(), resumed.trainer_state(), STEPS)
    check_same_decisions(
        read_jsonl(str(resumed.output_dir / DECISIONS_NAME)), read_jsonl(str(full.output_dir / DECISIONS_NAME))
    )

    # A state file cut short (as an in-place write killed would leave it): one message, no traceback.
    cut = tmp_path / "cut" / "out" / newest.name
    shutil.copytree(newest, cut)
    state = cut / STATE_NAME
    state.write_bytes(state.read_bytes()[:40])
    config = example_config(tmp_path / "cut", tiny_model, resume_from_checkpoint=str(cut), **SETTINGS)
    refused = run(["qtuning-llamafactory", "train", str(config)], tmp_path / "cut")
    assert refused.returncode == 1, refused.tail()
    assert f"qtuning-llamafactory: qtuning: cannot resume from {cut}: its {STATE_NAME} is cut short after 40 bytes" \
        in refused.output, refused.tail()
    assert f"delete {state} and resume" in refused.output and "Traceback" not in refused.output

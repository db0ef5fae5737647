"""`axolotl train` killed with SIGKILL at random moments and resumed each time finishes as the
uninterrupted run would, and leaves no file of the plugin half-written (about 2.5 minutes on 2
idle cores: 11 runs of the tiny model, 9 of them killed or refused).

A run that saves a checkpoint and writes its plots at every step is killed 8 times in a row
(`qtuning_probe.KillPlugin`, kill points drawn with a fixed seed): inside the scoring pass or a
training pass of its first or second step, or 0-60 ms into its first checkpoint save (the tiny
model's save takes about that long: such a kill leaves a checkpoint folder without its
``trainer_state.json``, or lands just after the save). After each kill every file the plugin wrote
must be whole (each checkpoint's ``qtuning_state.json`` read by the plugin's own loader, each PNG
ending in its IEND chunk and decoded by Pillow), and the next run resumes from the newest complete
checkpoint (the newest with a ``trainer_state.json``, which transformers writes last; it must hold
the ``qtuning_state.json`` written before it) in the same output folder. The last run goes to the
end; its log history (the killed runs' steps come back from the checkpoints) must hold the
uninterrupted run's Q-Tuning metrics at every step, and its decision log (``log_decisions``, the
killed runs' lines of steps past their checkpoint dropped on resume) the uninterrupted run's. Last, a resume from a checkpoint whose
``qtuning_state.json`` is cut short stops with the plugin's message.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path
from typing import Optional

import pytest

from axolotl_run import check_same_qtuning_metrics, run_axolotl_train, tiny_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference import check_same_decisions  # noqa: E402

STATE_NAME = "qtuning_state.json"

pytestmark = pytest.mark.integration

SEED = 36
KILLS = 8
# A kill makes at most one step of progress (see `kill_plan`); two steps to spare.
STEPS = KILLS + 2
# `saving` kills land up to this long after a checkpoint save starts: the tiny model's save takes
# some tens of milliseconds on 2 cores (a whole step about 2 s), a later kill lands in the next step.
SAVING_WINDOW_MS = 60
OVERRIDES = dict(
    steps=STEPS,
    save_steps=1,
    val_set_size=0.0,
    eval_steps=None,
    logging_steps=1,
    dataset_num_proc=1,
    # SeedPlugin: a run started afresh after a kill draws the same LoRA weights as the uninterrupted one
    plugins=["qtuning_plugin.QTuningPlugin", "qtuning_probe.SeedPlugin", "qtuning_probe.KillPlugin"],
    qtuning={"plot_every_n_steps": 1, "log_decisions": True},
)
# In the same process: no `accelerate launch` child, so that SIGKILL ends the whole run.
LAUNCHER = ["--launcher", "python"]
PNG_NAMES = ("qtuning_eu_plane.png", "qtuning_quadrant_fractions.png")
DECISIONS_NAME = "qtuning_decisions.jsonl"
PNG_SIGNATURE, PNG_END = b"\x89PNG\r\n\x1a\n", b"IEND\xaeB`\x82"


def kill_plan(seed: int) -> list[str]:
    """``QTUNING_KILL`` values in a seeded order: 3 in the scoring pass, 2 in a training pass, each
    at the first or second step of its run (at most one step saved before it), and 3 in the first
    checkpoint save of a run, one in each third of `SAVING_WINDOW_MS`."""
    rng = random.Random(seed)
    thirds = [SAVING_WINDOW_MS * third / 3 for third in range(3)]
    plan = [f"saving:1:{start + rng.uniform(0, SAVING_WINDOW_MS / 3):.0f}" for start in thirds]
    plan += [f"{event}:{rng.randint(1, 2)}" for event in ["scoring"] * 3 + ["training"] * 2]
    rng.shuffle(plan)
    return plan


def step_of(folder: Path) -> int:
    return int(folder.name.split("-")[1])


def newest_complete_checkpoint(output_dir: Path) -> Optional[Path]:
    """The newest checkpoint with a ``trainer_state.json`` (which transformers writes last); it must
    hold the Q-Tuning state (written before it)."""
    complete = [folder for folder in output_dir.glob("checkpoint-*") if (folder / "trainer_state.json").is_file()]
    newest = max(complete, key=step_of, default=None)
    assert newest is None or (newest / STATE_NAME).is_file(), sorted(p.name for p in newest.iterdir())
    return newest


def check_plugin_files(output_dir: Path) -> None:
    """Every file the plugin wrote under ``output_dir`` is whole."""
    from PIL import Image

    from qtuning_plugin.atomic_files import read_jsonl
    from qtuning_plugin.history import QTuningHistory

    for state in output_dir.glob(f"checkpoint-*/{STATE_NAME}"):
        assert QTuningHistory().load(str(state.parent)), state
    for name in PNG_NAMES:
        path = output_dir / name
        if path.exists():
            data = path.read_bytes()
            assert data.startswith(PNG_SIGNATURE) and data.endswith(PNG_END), f"{path}: {len(data)} bytes, cut short"
            with Image.open(path) as image:
                image.load()
    if (output_dir / DECISIONS_NAME).exists():
        read_jsonl(str(output_dir / DECISIONS_NAME))  # every whole line is JSON; a kill cuts only the last
    # Temporary files of the atomic writer are hidden and never the file itself.
    visible = {path.name for path in output_dir.rglob("*") if "qtuning" in path.name and not path.name.startswith(".")}
    assert visible <= {STATE_NAME, *PNG_NAMES, DECISIONS_NAME}, visible


def decision_lines(output_dir: Path) -> list[dict]:
    from qtuning_plugin.atomic_files import read_jsonl

    return read_jsonl(str(output_dir / DECISIONS_NAME))


def test_runs_killed_at_random_moments_resume_to_the_uninterrupted_metrics(tiny_model, tmp_path):
    full = run_axolotl_train(tiny_config(tmp_path / "full", tiny_model, **OVERRIDES), cli_args=LAUNCHER)
    assert full.returncode == 0, full.tail()
    check_plugin_files(full.output_dir)

    workdir = tmp_path / "killed"
    landed = []
    for spec in [*kill_plan(SEED), None]:
        checkpoint = newest_complete_checkpoint(workdir / "out")
        resume = {"resume_from_checkpoint": str(checkpoint)} if checkpoint else {}
        config = tiny_config(workdir, tiny_model, **OVERRIDES, **resume)
        run = run_axolotl_train(config, cli_args=LAUNCHER, extra_env={"QTUNING_KILL": spec} if spec else None)
        if spec is None:
            assert run.returncode == 0, run.tail()
        else:
            assert run.returncode == -9, f"{spec}: the run was not killed ({run.returncode}):\n{run.tail()}"
        check_plugin_files(run.output_dir)
        newest = max(run.output_dir.glob("checkpoint-*"), key=step_of, default=None)
        landed.append((spec, checkpoint and checkpoint.name, newest and sorted(p.name for p in newest.iterdir())))
    print("\n".join(f"kill {spec}: resumed from {start}; newest folder after it: {files}" for spec, start, files in landed))

    check_same_qtuning_metrics(full.trainer_state(), run.trainer_state(), STEPS)
    check_same_decisions(decision_lines(run.output_dir), decision_lines(full.output_dir))
    state = json.loads((run.output_dir / f"checkpoint-{STEPS}" / STATE_NAME).read_text())
    assert {point[4] for point in state["points"]} == set(range(1, STEPS + 1))

    # A state file cut short (as an in-place write killed would leave it) stops the resume with
    # the plugin's message, not a JSON parser's traceback.
    cut = tmp_path / "cut" / "out" / f"checkpoint-{STEPS - 1}"
    shutil.copytree(run.output_dir / cut.name, cut)
    (cut / STATE_NAME).write_bytes((cut / STATE_NAME).read_bytes()[:40])
    config = tiny_config(tmp_path / "cut", tiny_model, **OVERRIDES, resume_from_checkpoint=str(cut))
    refused = run_axolotl_train(config, cli_args=LAUNCHER)
    assert refused.returncode != 0
    assert f"cannot resume from {cut}: its {STATE_NAME} is cut short after 40 bytes" in refused.output, refused.tail()
    assert f"delete {cut / STATE_NAME} and resume" in refused.output and "JSONDecodeError" not in refused.output

"""Checkpoint and resume: a run resumed from checkpoint-3 selects, logs, plots and writes its decision
log as the uninterrupted run.

The tiny LoRA Llama (dropout 0) under a plain `transformers.Trainer` with the
mixin: its sampler is seeded and resuming skips the consumed batches, so
steps 4-6 see the same data; the Q-Tuning warm start counts optimizer steps
(`state.global_step`), and the metrics history comes back from
``qtuning_state.json``.
"""

import json
import os

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from qtuning_plugin import QTuningConfig, QTuningTrainerMixin
from qtuning_plugin.atomic_files import read_jsonl
from qtuning_plugin.decisions import DECISIONS_NAME
from qtuning_plugin.history import STATE_NAME, quadrant_fractions
from qtuning_plugin.plots import EU_PLANE_PNG, QUADRANTS_PNG

from conftest import Rows, random_batch, tiny_llama
from reference import check_same_decisions

STEPS, SAVE_AT = 6, 3
CONFIG = {"sample_keep_ratio": 0.5, "token_keep_ratio": 0.5, "warmup_steps": 4, "log_decisions": True}


class RecordingTrainer(QTuningTrainerMixin, Trainer):
    """Remembers every triage's sample and token masks, and the warm steps, by optimizer step (1-based),
    through the public ``qtuning_on_selection`` hook."""

    def __init__(self, *args, **kwargs):
        self.masks = {}
        self.warm_steps = []
        super().__init__(*args, qtuning_on_selection=self.record, **kwargs)

    def record(self, event):
        if event.selection is None:
            self.warm_steps.append(event.step)
        else:
            self.masks[event.step] = (event.selection.sample_mask.clone(), event.selection.token_mask.clone())


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
            control.should_save = True


# triage_scope: (micro_batch_size, gradient_accumulation_steps), 8 samples per optimizer step
SHAPES = {"micro_batch": (8, 1), "step": (4, 2)}


def make_trainer(output_dir, scope, stop_at=None, config=CONFIG):
    micro_batch_size, accumulation = SHAPES[scope]
    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=micro_batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=STEPS,
        learning_rate=1e-2,
        lr_scheduler_type="linear",
        logging_steps=1,
        save_strategy="steps",
        save_steps=SAVE_AT,
        report_to=[],
        use_cpu=True,
        seed=7,
        data_seed=7,
        dataloader_drop_last=True,
    )
    trainer = RecordingTrainer(
        model=tiny_llama(seed=0),
        args=args,
        train_dataset=Rows(random_batch(batch=64, length=16, seed=11)),
        qtuning_config=QTuningConfig(triage_scope=scope, **config),
    )
    if stop_at is not None:
        trainer.add_callback(StopAt(stop_at))
    return trainer


def _logged(trainer):
    return {entry["step"]: entry for entry in trainer.state.log_history if "loss" in entry}


@pytest.fixture(scope="module", params=list(SHAPES))
def runs(tmp_path_factory, request):
    root = tmp_path_factory.mktemp("resume")
    full = make_trainer(root / "full", request.param)
    full.train()
    first = make_trainer(root / "split", request.param, stop_at=SAVE_AT)
    first.train()
    # What a run killed at step 7 would have left of the decision log: steps past the checkpoint,
    # the last line cut short.
    leftover = (root / "full" / DECISIONS_NAME).read_text(encoding="utf-8") + '{"step": 7, "ke'
    (root / "split" / DECISIONS_NAME).write_text(leftover, encoding="utf-8")
    resumed = make_trainer(root / "split", request.param)
    resumed.train(resume_from_checkpoint=str(root / "split" / f"checkpoint-{SAVE_AT}"))
    return full, first, resumed


def test_the_checkpoint_holds_the_qtuning_state_and_the_rng(runs):
    full, _, _ = runs
    checkpoint = os.path.join(full.args.output_dir, f"checkpoint-{SAVE_AT}")
    with open(os.path.join(checkpoint, STATE_NAME), encoding="utf-8") as handle:
        state = json.load(handle)
    assert state["tokens"]["trainable"] > 0 and state["tokens"]["kept"] == state["tokens"]["trainable"]  # warm-up
    assert os.path.isfile(os.path.join(checkpoint, "rng_state.pth"))  # Trainer saves and restores the RNG


def test_resumed_steps_select_as_the_uninterrupted_run(runs):
    full, first, resumed = runs
    assert sorted(first.masks) == [] and sorted(resumed.masks) == [5, 6]  # warm start: steps 1-4 select nothing
    assert full.warm_steps == [1, 2, 3, 4]
    assert first.warm_steps == [1, 2, 3] and resumed.warm_steps == [4]
    for step in (5, 6):
        assert torch.equal(resumed.masks[step][0], full.masks[step][0])
        assert torch.equal(resumed.masks[step][1], full.masks[step][1])
    assert not all(bool(full.masks[step][0].all()) for step in (5, 6))  # samples really are dropped


def test_resumed_metrics_continue_the_uninterrupted_ones(runs):
    full, _, resumed = runs
    expected, got = _logged(full), _logged(resumed)
    assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        for key, value in expected[step].items():
            if key.startswith("qtuning/"):
                assert got[step][key] == pytest.approx(value, rel=1e-6), (step, key)
    saved = [expected[step]["qtuning/tokens_saved_frac_cumulative"] for step in range(1, STEPS + 1)]
    assert saved[:4] == [0.0] * 4 and 0.0 < saved[4] < saved[5]
    # The plots' data: the quadrant fractions of the (restored) log history, and the EU-plane points.
    fractions = quadrant_fractions(resumed.state.log_history)
    assert fractions["step"] == [5, 6]
    for name, values in quadrant_fractions(full.state.log_history).items():
        assert fractions[name] == pytest.approx(values, rel=1e-6), name
    assert len(resumed.qtuning_history.points) == len(full.qtuning_history.points) > 0
    for got_point, expected_point in zip(resumed.qtuning_history.points, full.qtuning_history.points):
        assert got_point[2:] == expected_point[2:]  # quadrant, fill-up flag, step
        assert got_point[:2] == pytest.approx(expected_point[:2], rel=1e-6)  # PPL, Ent


def test_the_resumed_decision_log_is_the_uninterrupted_runs(runs):
    full, _, resumed = runs
    expected = read_jsonl(os.path.join(full.args.output_dir, DECISIONS_NAME))
    assert [line["step"] for line in expected] == [5] * 8 + [6] * 8  # warm-up steps triage nothing
    check_same_decisions(read_jsonl(os.path.join(resumed.args.output_dir, DECISIONS_NAME)), expected)


REQUIRED_METRICS = [
    *(f"qtuning/samples_{q}" for q in ("q1", "q2", "q3", "q4", "middle")),
    "qtuning/kept_sample_frac", "qtuning/kept_token_frac", "qtuning/alpha",
    "qtuning/ppl_hi", "qtuning/ppl_lo", "qtuning/ent_lo", "qtuning/ent_hi",
    "qtuning/ppl_kept_mean", "qtuning/ppl_dropped_mean", "qtuning/ent_kept_mean", "qtuning/ent_dropped_mean",
    "qtuning/tokens_saved_frac_cumulative",
]


def test_every_logging_step_carries_the_qtuning_metrics(runs):
    full, _, _ = runs
    logged = _logged(full)
    for step in (5, 6):  # pruned steps
        missing = [key for key in REQUIRED_METRICS if key not in logged[step]]
        assert not missing, (step, missing)
    assert logged[1]["qtuning/warmup"] == 1.0 and "qtuning/tokens_saved_frac_cumulative" in logged[1]


def test_plots_are_written_at_the_end_of_training(runs):
    full, _, resumed = runs
    for trainer in (full, resumed):
        for name in (EU_PLANE_PNG, QUADRANTS_PNG):
            path = os.path.join(trainer.args.output_dir, name)
            assert os.path.getsize(path) > 10_000, path


def test_the_qtuning_state_is_in_the_checkpoint_before_the_trainer_state(tmp_path, monkeypatch):
    """transformers writes ``trainer_state.json`` last: a run killed before it leaves a folder that
    is not resumed from; one killed after it must find ``qtuning_state.json`` there already."""
    from transformers import TrainerState

    found = []
    save_to_json = TrainerState.save_to_json

    def record_then_save(state, path):
        found.append(os.path.isfile(os.path.join(os.path.dirname(path), STATE_NAME)))
        save_to_json(state, path)

    monkeypatch.setattr(TrainerState, "save_to_json", record_then_save)
    make_trainer(tmp_path, "micro_batch").train()
    assert found == [True, True]  # the checkpoints of steps 3 and 6


def test_an_unreadable_state_stops_the_resume_with_the_loader_error(tmp_path):
    from qtuning_plugin.history import QTuningStateError

    checkpoint = tmp_path / "checkpoint-3"
    checkpoint.mkdir()
    (checkpoint / STATE_NAME).write_text('{"version": 2, "pending": {"qtuning/al')
    trainer = make_trainer(tmp_path / "out", "micro_batch")
    with pytest.raises(QTuningStateError, match="cut short after 38 bytes"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == 0


# Steps 2 and 3 fill the window of 3 steps before the checkpoint; steps 4-6 pool it.
WINDOW_CONFIG = {**CONFIG, "warmup_steps": 1, "triage_window": 3}


@pytest.fixture(scope="module")
def window_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume_window")
    full = make_trainer(root / "full", "step", config=WINDOW_CONFIG)
    full.train()
    make_trainer(root / "split", "step", stop_at=SAVE_AT, config=WINDOW_CONFIG).train()
    checkpoint = root / "split" / f"checkpoint-{SAVE_AT}"
    resumed = make_trainer(root / "split", "step", config=WINDOW_CONFIG)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    # The same checkpoint, its state file as a release without windows wrote it (version 2).
    state = json.loads((checkpoint / STATE_NAME).read_text())
    old = root / "old" / checkpoint.name
    old.parent.mkdir()
    import shutil

    shutil.copytree(checkpoint, old)
    (old / STATE_NAME).write_text(json.dumps({**{k: v for k, v in state.items() if k != "window"}, "version": 2}))
    without = make_trainer(root / "old", "step", config=WINDOW_CONFIG)
    without.train(resume_from_checkpoint=str(old))
    return full, resumed, without, state


def test_the_checkpoint_holds_the_triage_window_and_the_resumed_run_selects_as_the_uninterrupted(window_runs):
    full, resumed, _, state = window_runs
    assert state["version"] == 3 and len(state["window"]) == 2  # steps 2 and 3
    assert [len(step) for step in state["window"]] == [8, 8]
    assert sorted(resumed.masks) == [4, 5, 6]
    for step in (4, 5, 6):
        assert torch.equal(resumed.masks[step][0], full.masks[step][0]), step
        assert torch.equal(resumed.masks[step][1], full.masks[step][1]), step
    expected, got = _logged(full), _logged(resumed)
    for step in (4, 5, 6):
        assert got[step]["qtuning/window_samples"] == expected[step]["qtuning/window_samples"] == 24
        assert got[step]["qtuning/ppl_hi"] == pytest.approx(expected[step]["qtuning/ppl_hi"], rel=1e-6)


def test_an_older_state_without_a_window_resumes_with_an_empty_window(window_runs):
    """The run resumes (no error); step 4 pools no earlier step, so its thresholds are its own."""
    full, _, without, _ = window_runs
    assert sorted(without.masks) == [4, 5, 6]
    logged = _logged(without)
    assert [logged[step]["qtuning/window_samples"] for step in (4, 5, 6)] == [8, 16, 24]
    assert any(not torch.equal(without.masks[step][0], full.masks[step][0]) for step in (4, 5))

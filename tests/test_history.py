"""`QTuningHistory` (metrics, plot data, checkpoint state) and the training pictures."""

import math

import pytest
import torch

from qtuning_plugin import QTuningConfig, select
from qtuning_plugin.history import QTuningHistory, quadrant_labels
from qtuning_plugin.plots import EU_PLANE_PNG, QUADRANTS_PNG, write_training_plots

from test_select import make_batch


def selection(seed=0, ratio=0.25):
    nll, entropy, mask = make_batch(seed=seed)
    mask[5] = False  # one sample without trainable tokens
    return select(nll, entropy, mask, QTuningConfig(sample_keep_ratio=ratio))


def test_quadrant_labels_agree_with_the_logged_counts():
    sel = selection()
    labels, filled = quadrant_labels(
        sel.ppl.tolist(), sel.ent.tolist(), sel.sample_mask.tolist(), sel.q2.tolist(), sel.triage
    )
    assert labels[5] == ""
    for name in ("Q1", "Q2", "Q3", "Q4", "middle"):
        assert labels.count(name) == sel.stats[f"qtuning/samples_{name.lower()}"], name
    assert sum(filled) == sel.stats["qtuning/samples_filled"]


def test_flush_averages_micro_batches_and_keeps_a_cumulative_token_count():
    history = QTuningHistory()
    history.record({"qtuning/alpha": 0.1}, 100, 40)
    history.record({"qtuning/alpha": 0.3}, 100, 60)
    metrics = history.flush(step=1)
    assert metrics["qtuning/alpha"] == pytest.approx(0.2)
    assert metrics["qtuning/tokens_saved_frac_cumulative"] == pytest.approx(0.5)
    history.record({"qtuning/alpha": 0.5}, 200, 200)
    assert history.flush(step=2)["qtuning/tokens_saved_frac_cumulative"] == pytest.approx(0.25)
    assert [entry["step"] for entry in history.steps] == [1, 2]
    assert history.flush(step=3) == {"qtuning/tokens_saved_frac_cumulative": pytest.approx(0.25)}
    assert len(history.steps) == 2  # nothing recorded: no new entry


def test_state_round_trips_through_json(tmp_path):
    history = QTuningHistory(max_points=10)
    for step in range(1, 4):
        sel = selection(seed=step)
        history.record(sel.stats, 50, 20)
        history.record_samples(sel, step)
        history.flush(step)
    history.record({"qtuning/alpha": 0.4}, 10, 5)  # pending at save time
    assert len(history.points) == 10 and history.thresholds["step"] == 3
    history.save(str(tmp_path))
    restored = QTuningHistory(max_points=10)
    assert restored.load(str(tmp_path))
    assert restored.state_dict() == history.state_dict()
    assert not QTuningHistory().load(str(tmp_path / "missing"))


def test_training_plots(tmp_path):
    history = QTuningHistory()
    history.record({"qtuning/warmup": 1.0}, 10, 10)
    history.flush(1)  # a warm-up step: no quadrant counts, left out of the plot
    for step in range(2, 6):
        sel = selection(seed=step, ratio=0.5)
        history.record(sel.stats, 50, 20)
        history.record_samples(sel, step)
        history.flush(step)
    fractions = history.quadrant_fractions()
    assert fractions["step"] == [2, 3, 4, 5]
    for i in range(4):
        assert sum(fractions[name][i] for name in ("Q1", "Q2", "Q3", "Q4", "middle")) == pytest.approx(1.0)
    paths = write_training_plots(history, str(tmp_path), step=5)
    assert [p.split("/")[-1] for p in paths] == [EU_PLANE_PNG, QUADRANTS_PNG]
    assert all((tmp_path / name).stat().st_size > 10_000 for name in (EU_PLANE_PNG, QUADRANTS_PNG))
    # An empty history still gives (empty) pictures rather than an error.
    write_training_plots(QTuningHistory(), str(tmp_path / "empty"))


def test_plot_callback_writes_every_n_steps_on_the_main_process_only(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import qtuning_plugin.plots as plots
    from qtuning_plugin.callbacks import QTuningPlotCallback

    written = []
    monkeypatch.setattr(plots, "write_training_plots", lambda history, out, step=None: written.append(step) or [])
    callback = QTuningPlotCallback(QTuningHistory(), every_n_steps=3)
    args = SimpleNamespace(output_dir=str(tmp_path))
    state = SimpleNamespace(global_step=0, is_world_process_zero=True)
    callback.on_train_begin(args, state, None)
    for step in range(1, 9):
        state.global_step = step
        callback.on_log(args, state, None, logs={"loss": 1.0})
        callback.on_log(args, state, None, logs={"eval_loss": 1.0})  # not a training log
    callback.on_train_end(args, state, None)
    assert written == [3, 6, 8]
    state.is_world_process_zero = False
    callback.on_train_end(args, state, None)
    assert written == [3, 6, 8]

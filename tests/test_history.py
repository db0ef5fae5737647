"""`QTuningHistory` (metrics, plot data, checkpoint state) and the training pictures."""

import math

import pytest
import torch

from qtuning_plugin import QTuningConfig, select
from qtuning_plugin.history import STATE_NAME, EUPoint, QTuningHistory, QTuningStateError, quadrant_fractions
from qtuning_plugin.plots import EU_PLANE_PNG, QUADRANTS_PNG, write_training_plots

from test_select import make_batch


def selection(seed=0, ratio=0.25):
    nll, entropy, mask = make_batch(seed=seed)
    mask[5] = False  # one sample without trainable tokens
    return select(nll, entropy, mask, QTuningConfig(sample_keep_ratio=ratio))


def one_token_batch(ppl, ent):
    """One trainable token a sample (the middle of three), so that PPL = exp(nll) and Ent = entropy;
    a NaN PPL makes a sample without trainable tokens."""
    n = len(ppl)
    nll = torch.tensor(ppl, dtype=torch.float64).log().nan_to_num(0.0)[:, None].expand(n, 3).clone()
    entropy = torch.tensor(ent, dtype=torch.float64)[:, None].expand(n, 3).clone()
    mask = torch.zeros(n, 3, dtype=torch.bool)
    mask[:, 1] = ~torch.tensor(ppl).isnan()
    return nll, entropy, mask


def test_points_are_the_samples_with_their_quadrant():
    """The hand-worked quadrants of `test_select.test_quadrant_counts_by_hand` (0: Q1, 1: Q2, 2: Q3,
    3: Q4, 4-7 the middle band), plus a sample without trainable tokens, left out."""
    ppl = [10.0, 10.0, 1.0, 1.0, 5.0, 5.0, 5.0, 5.0, math.nan]
    ent = [3.0, 0.1, 0.1, 3.0, 1.5, 1.5, 1.5, 1.5, 0.0]
    selection = select(*one_token_batch(ppl, ent), QTuningConfig(sample_keep_ratio=0.25))
    assert selection.stats["qtuning/samples_filled"] == 0  # Q2 and Q4 kept by the thresholds
    history = QTuningHistory()
    history.record_samples(selection, step=7)
    assert list(history.points) == [
        EUPoint(pytest.approx(p), pytest.approx(e), name, False, 7)
        for p, e, name in zip(ppl, ent, ["Q1", "Q2", "Q3", "Q4"] + ["middle"] * 4)
    ]
    assert history.thresholds["step"] == 7 and history.thresholds["ppl_hi"] == pytest.approx(5 + 0.285 * 5)


def test_points_mark_the_fill_up():
    """`test_triage.test_fill_up_adds_by_support_and_files_by_side`: samples 1 (Q2) and 2 (Q4) are
    kept by the fill-up."""
    selection = select(*one_token_batch([1, 2, 4, 8], [1, 1.2, 3.5, 4]), QTuningConfig(sample_keep_ratio=0.5))
    assert selection.stats["qtuning/samples_filled"] == 2
    history = QTuningHistory()
    history.record_samples(selection, step=1)
    points = list(history.points)
    assert [p.filled for p in points] == [False, True, True, False]
    assert [p.quadrant for p in points[1:3]] == ["Q2", "Q4"]


def test_flush_averages_micro_batches_and_keeps_a_cumulative_token_count():
    history = QTuningHistory()
    history.record({"qtuning/alpha": 0.1}, 100, 40)
    history.record({"qtuning/alpha": 0.3}, 100, 60)
    metrics = history.flush()
    assert metrics["qtuning/alpha"] == pytest.approx(0.2)
    assert metrics["qtuning/tokens_saved_frac_cumulative"] == pytest.approx(0.5)
    history.record({"qtuning/alpha": 0.5}, 200, 200)
    assert history.flush()["qtuning/tokens_saved_frac_cumulative"] == pytest.approx(0.25)
    assert history.flush() == {"qtuning/tokens_saved_frac_cumulative": pytest.approx(0.25)}


def test_state_round_trips_through_json(tmp_path):
    history = QTuningHistory(max_points=10)
    for step in range(1, 4):
        sel = selection(seed=step)
        history.record(sel.stats, 50, 20)
        history.record_samples(sel, step)
        history.flush()
    history.record({"qtuning/alpha": 0.4}, 10, 5)  # pending at save time
    assert len(history.points) == 10 and history.thresholds["step"] == 3
    history.save(str(tmp_path))
    restored = QTuningHistory(max_points=10)
    assert restored.load(str(tmp_path))
    assert restored.state_dict() == history.state_dict()
    assert list(restored.points) == list(history.points) and isinstance(restored.points[0], EUPoint)
    assert not QTuningHistory().load(str(tmp_path / "missing"))


def test_a_version_1_state_file_is_read(tmp_path):
    """Version 1 also held a copy of the logged metrics ("steps"); it is ignored."""
    import json

    state = {"version": 1, "pending": {"qtuning/alpha": [0.2]}, "tokens": {"trainable": 10.0, "kept": 4.0},
             "steps": [{"step": 1, "qtuning/alpha": 0.1}], "points": [[2.0, 1.0, "Q2", False, 1]], "thresholds": None}
    (tmp_path / STATE_NAME).write_text(json.dumps(state))
    history = QTuningHistory()
    assert history.load(str(tmp_path))
    assert list(history.points) == [EUPoint(2.0, 1.0, "Q2", False, 1)] and history.tokens["kept"] == 4.0
    state["version"] = 99
    (tmp_path / STATE_NAME).write_text(json.dumps(state))
    with pytest.raises(ValueError, match="version 99"):
        history.load(str(tmp_path))


def saved_state(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    history = QTuningHistory()
    sel = selection(seed=1)
    history.record(sel.stats, 50, 20)
    history.record_samples(sel, 1)
    return history.save(str(tmp_path))


def load_error(folder):
    with pytest.raises(QTuningStateError) as caught:
        QTuningHistory().load(str(folder))
    return str(caught.value)


def test_a_save_that_fails_midway_leaves_the_previous_state(tmp_path):
    path = saved_state(tmp_path)
    before = open(path, "rb").read()
    history = QTuningHistory()
    history.record({"qtuning/alpha": 0.5}, 10, 5)
    history.thresholds = {"ppl_hi": object()}  # json.dump fails after writing the start of the file
    with pytest.raises(TypeError):
        history.save(str(tmp_path))
    assert open(path, "rb").read() == before and sorted(p.name for p in tmp_path.iterdir()) == [STATE_NAME]


def test_every_cut_of_a_state_file_is_reported_as_cut_short(tmp_path):
    path = saved_state(tmp_path)
    data = open(path, "rb").read()
    for size in range(0, len(data) - 1):  # a file cut after `size` bytes, as an in-place write killed leaves it
        open(path, "wb").write(data[:size])
        message = load_error(tmp_path)
        assert ("cut short" in message and f"after {size} bytes" in message) or (size == 0 and "is empty" in message)


def test_the_error_names_the_file_what_is_wrong_and_the_ways_out(tmp_path):
    path = saved_state(tmp_path / "checkpoint-40")
    data = open(path, "rb").read()
    open(path, "wb").write(data[:40])
    message = load_error(tmp_path / "checkpoint-40")
    assert f"cannot resume from {tmp_path / 'checkpoint-40'}: its {STATE_NAME} is cut short after 40 bytes" in message
    assert f"an earlier checkpoint-N folder of {tmp_path}" in message
    assert f"delete {path} and resume from this checkpoint with Q-Tuning's history reset" in message
    assert "qtuning/tokens_saved_frac_cumulative restart from zero" in message and "EU-plane plot" in message


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"<html>not a state</html>", "is not JSON (Expecting value: line 1 column 1 (char 0))"),
        (b'{"version": 2} trailing', "is not JSON (Extra data"),
        (b"\xff\xfe{}", "is not JSON (not UTF-8 text"),
        (b"[1, 2]", "is not a Q-Tuning state (a JSON list, not an object)"),
        (b'{"version": 99, "pending": {}}', "has format version 99, which this release cannot read (it reads versions 1, 2, 3;"),
        (b'{"pending": {}, "tokens": {}}', "has no format version, which this release cannot read"),
        (b'{"version": 2, "pending": {}}', "is not a Q-Tuning state (version 2 without tokens, points, thresholds)"),
        (b'{"version": 3, "pending": {}, "tokens": {}, "points": [], "thresholds": null}',
         "is not a Q-Tuning state (version 3 without window)"),
    ],
)
def test_each_unreadable_state_is_named(tmp_path, content, problem):
    (tmp_path / STATE_NAME).write_bytes(content)
    message = load_error(tmp_path)
    assert f"its {STATE_NAME} {problem}" in message and "Ways out" in message


def test_the_state_error_is_a_settings_error():
    """Every host reports a `QTuningSettingsError` as one message (the LLaMA-Factory launcher without a traceback)."""
    from qtuning_plugin.rules import QTuningSettingsError

    assert issubclass(QTuningStateError, QTuningSettingsError)


def counts(*values):
    return {f"qtuning/samples_{q}": n for q, n in zip(("q1", "q2", "q3", "q4", "middle"), values)}


def test_quadrant_fractions_from_the_log_history():
    log_history = [
        {"loss": 2.0, "qtuning/warmup": 1.0, "step": 1},  # a warm-up step: no quadrant counts, left out
        {"loss": 1.5, "step": 2, **counts(1, 2, 1, 2, 2)},
        {"eval_loss": 1.4, "step": 2},
        {"loss": 1.2, "step": 3, **counts(0, 1, 0, 3, 0)},
    ]
    assert quadrant_fractions(log_history) == {
        "step": [2, 3], "Q1": [0.125, 0.0], "Q2": [0.25, 0.25], "Q3": [0.125, 0.0], "Q4": [0.25, 0.75],
        "middle": [0.25, 0.0],
    }


def test_training_plots(tmp_path):
    history, log_history = QTuningHistory(), []
    for step in range(2, 6):
        sel = selection(seed=step, ratio=0.5)
        history.record(sel.stats, 50, 20)
        history.record_samples(sel, step)
        log_history.append({"loss": 1.0, **history.flush(), "step": step})  # as Trainer.log appends it
    assert quadrant_fractions(log_history)["step"] == [2, 3, 4, 5]
    paths = write_training_plots(history, log_history, str(tmp_path), step=5)
    assert [p.split("/")[-1] for p in paths] == [EU_PLANE_PNG, QUADRANTS_PNG]
    assert all((tmp_path / name).stat().st_size > 10_000 for name in (EU_PLANE_PNG, QUADRANTS_PNG))
    # An empty history still gives (empty) pictures rather than an error.
    write_training_plots(QTuningHistory(), [], str(tmp_path / "empty"))


def test_plot_callback_writes_every_n_steps_on_the_main_process_only(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import qtuning_plugin.plots as plots
    from qtuning_plugin.hf.callbacks import QTuningPlotCallback

    written = []
    monkeypatch.setattr(
        plots, "write_training_plots", lambda history, log_history, out, step=None: written.append(step) or []
    )
    callback = QTuningPlotCallback(QTuningHistory(), every_n_steps=3)
    args = SimpleNamespace(output_dir=str(tmp_path))
    state = SimpleNamespace(global_step=0, is_world_process_zero=True, log_history=[])
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

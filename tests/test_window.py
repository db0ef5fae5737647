"""Triage windows (`triage_window`, docs/algorithm.md section 4a) through the engine: a window of one
step is the paper's rule at every step, a longer one pools the earlier steps as the transcription
in `tests/reference.py` says, and the window survives a checkpoint."""

import json
import math

import pytest
import torch

from qtuning_plugin import QTuningConfig, select
from qtuning_plugin._logging import LOG
from qtuning_plugin.core.triage import QUADRANTS
from qtuning_plugin.core.window import TriageWindow
from qtuning_plugin.engine import MicroBatch, QTuningEngine
from qtuning_plugin.history import STATE_NAME, QTuningHistory

from reference import reference_pooled_triage

pytestmark = pytest.mark.env_independent  # torch only: `make test` only


def random_step(seed: int, rows: int, length: int = 10):
    """Two micro-batches of ``rows`` rows with random per-token statistics; labels mask a prompt of
    1-3 tokens, and one row of the step has no trainable token."""
    generator = torch.Generator().manual_seed(seed)
    batches, scores = [], []
    for part in range(2):
        labels = torch.randint(5, 100, (rows, length), generator=generator)
        for b in range(rows):
            labels[b, : 1 + (b + seed) % 3] = -100
        if part == seed % 2:
            labels[seed % rows] = -100
        batch = MicroBatch.prepare({"input_ids": labels.clamp(min=0), "labels": labels})
        batches.append(batch)
        nll = torch.rand(rows, length, generator=generator) * 4
        entropy = torch.rand(rows, length, generator=generator) * 3
        scores.append((nll, entropy))
    return batches, scores


STEP_ROWS = (4, 4, 3, 5, 4, 4, 2, 4)  # rows per micro-batch, step after step


def test_a_window_of_one_step_selects_every_step_as_the_step_alone():
    """``triage_window: 1`` across steps: each step's selection is core `select` on that step with no
    window, bit for bit, and the window holds nothing."""
    config = QTuningConfig(sample_keep_ratio=0.25, triage_window=1)
    engine = QTuningEngine(config, data_parallel=False)
    for step, rows in enumerate(STEP_ROWS, start=1):
        batches, scores = random_step(step, rows)
        event = engine.select(batches, scores, step)
        alone = select(
            torch.cat([nll for nll, _ in scores]), torch.cat([e for _, e in scores]),
            torch.cat([b.mask for b in batches]), config,
        )
        for name in ("sample_mask", "token_mask", "q2", "quadrant", "filled"):
            assert torch.equal(getattr(event.selection, name), getattr(alone, name)), (step, name)
        assert event.stats == alone.stats and "qtuning/window_samples" not in event.stats
        assert engine.window.earlier() is None


@pytest.mark.parametrize("window, ratio", [(3, 0.25), (4, 0.5)])
def test_windowed_steps_pool_the_earlier_steps_as_the_transcription(window, ratio):
    """Each step against `reference_pooled_triage` with the valid (PPL, Ent) of the ``window - 1``
    steps before it, kept by this test; the step keeps exactly its K."""
    engine = QTuningEngine(QTuningConfig(sample_keep_ratio=ratio, triage_window=window), data_parallel=False)
    earlier_steps: list[list[tuple[float, float]]] = []
    differs_from_alone = 0
    for step, rows in enumerate(STEP_ROWS, start=1):
        batches, scores = random_step(100 + step, rows)
        selection = engine.select(batches, scores, step).selection
        valid = [i for i, q in enumerate(selection.quadrant.tolist()) if q >= 0]
        ppl, ent = selection.ppl[valid].tolist(), selection.ent[valid].tolist()
        earlier = [pair for past in earlier_steps[-(window - 1):] for pair in past]
        expected = reference_pooled_triage(ppl, ent, [p for p, _ in earlier], [e for _, e in earlier], ratio, hold=True)
        assert selection.sample_mask[valid].tolist() == expected.keep, step
        assert selection.q2[valid].tolist() == expected.q2, step
        assert selection.filled[valid].tolist() == expected.filled, step
        assert [QUADRANTS[q] for q in selection.quadrant[valid].tolist()] == expected.quadrant, step
        assert int(selection.sample_mask.sum()) == max(1, round(ratio * len(valid)))
        assert selection.stats["qtuning/window_samples"] == len(valid) + len(earlier)
        assert selection.stats["qtuning/samples_trimmed"] == sum(expected.trimmed)
        alone = reference_pooled_triage(ppl, ent, [], [], ratio, hold=True)
        differs_from_alone += alone.keep != expected.keep
        earlier_steps.append(list(zip(ppl, ent)))
    assert differs_from_alone  # the window changed what some step kept


def test_the_window_keeps_the_valid_samples_of_its_last_steps_and_round_trips():
    window = TriageWindow(3)
    for step in range(4):
        rows = torch.tensor([[1.0 + step, 0.5, 1.0], [math.nan, math.nan, 0.0], [2.0 + step, 0.25, 1.0]], dtype=torch.float64)
        window.push(rows)
    assert window.earlier().tolist() == [[3.0, 0.5], [4.0, 0.25], [4.0, 0.5], [5.0, 0.25]]  # steps 2 and 3 (0-based)
    state = json.loads(json.dumps(window.state_dict()))
    restored = TriageWindow(3)
    restored.load_state_dict(state)
    assert torch.equal(restored.earlier(), window.earlier())
    shorter = TriageWindow(2)
    shorter.load_state_dict(state)
    assert shorter.earlier().tolist() == [[4.0, 0.5], [5.0, 0.25]]  # the most recent step
    one = TriageWindow(1)
    one.load_state_dict(state)
    one.push(rows)
    assert one.earlier() is None
    with pytest.raises(ValueError, match="at least 1 step"):
        TriageWindow(0)


def test_the_history_saves_and_restores_the_engines_window(tmp_path):
    engine = QTuningEngine(QTuningConfig(triage_window=3), data_parallel=False)
    history = QTuningHistory(window=engine.window)
    for step, rows in enumerate(STEP_ROWS[:4], start=1):
        engine.select(*random_step(step, rows), step)
    history.save(str(tmp_path))
    state = json.loads((tmp_path / STATE_NAME).read_text())
    assert state["version"] == 3 and len(state["window"]) == 2
    resumed = QTuningEngine(QTuningConfig(triage_window=3), data_parallel=False)
    assert QTuningHistory(window=resumed.window).load(str(tmp_path))
    assert torch.equal(resumed.window.earlier(), engine.window.earlier())
    batches, scores = random_step(99, 4)
    assert torch.equal(resumed.select(batches, scores, 5).selection.sample_mask,
                       engine.select(batches, scores, 5).selection.sample_mask)
    history.reset()
    assert engine.window.earlier() is None  # a new run starts with an empty window


def test_a_state_file_without_a_window_loads_with_an_empty_one(tmp_path, caplog):
    """Versions 1 and 2 of ``qtuning_state.json`` had no window: the run resumes, the window empty, and
    says so where a window is configured."""
    state = {"version": 2, "pending": {}, "tokens": {"trainable": 10.0, "kept": 4.0}, "points": [], "thresholds": None}
    (tmp_path / STATE_NAME).write_text(json.dumps(state))
    window = TriageWindow(4)
    window.push(torch.tensor([[2.0, 1.0, 1.0]], dtype=torch.float64))
    with caplog.at_level("WARNING", logger=LOG.logger.name):
        assert QTuningHistory(window=window).load(str(tmp_path))
    assert window.earlier() is None
    assert "without triage windows; the window of triage_window=4 starts empty" in caplog.text

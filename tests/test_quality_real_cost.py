"""The real-model track's equal-cost accounting (`benchmarks/quality/real.py`, `cost.py`), in process on the
tiny random Llama: every arm's counted tokens against a hand count of the items it scored and trained,
the budget against full-data SFT's tokens, and where each run stops and is graded."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "benchmarks" / "quality")]
import real  # noqa: E402

# The quality benchmark's tooling, which runs in `make test`'s environment (with scipy): `make test` only.
pytestmark = pytest.mark.env_independent

RATIO = 3.0  # a forward+backward token costs 3 forward tokens here
STEPS = 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each arm of seed 0 trained to the budget of STEPS full-data steps; the held-out loss graded at
    half of it (an evaluation, which the cost must not count)."""
    from qtuning_plugin.tiny import build_tiny_model

    real.quiet()
    folder = str(build_tiny_model(tmp_path_factory.mktemp("tiny")))
    _, tokenizer = real.load_model(folder, lora=False)
    data = real.seed_data(tokenizer, 0, STEPS, 4, RATIO)
    out = {}
    for arm in real.ARMS:
        marks = [real.Mark(data.budget / 2, "half", lambda m: real.heldout_loss(m, tokenizer, data.test)),
                 real.Mark(data.budget, "final", lambda m: {})]
        out[arm] = real.train_arm(arm, folder, tokenizer, data.dataset, data.order, 0, marks, "cost", RATIO)
    return data, out


def hand_count(data, steps: list[list[int]]) -> int:
    return sum(len(data.dataset[i]["input_ids"]) for step in steps for i in step)


def test_budget_is_full_data_sfts_tokens_over_its_steps(runs):
    data, _ = runs
    first = data.order[:STEPS]
    assert [len(step) for step in first] == [real.STEP_SAMPLES] * STEPS
    assert data.budget == RATIO * hand_count(data, first)


@pytest.mark.parametrize("arm", list(real.ARMS))
def test_counted_tokens_are_the_items_scored_and_trained(runs, arm):
    """After every step: forward-only tokens = the items scored so far (Q-Tuning's scoring forward),
    forward+backward tokens = the items trained so far, padding not counted; the cost is their
    weighted sum."""
    data, out = runs
    res = out[arm]
    for s, counts in enumerate(res["steps"]):
        assert counts["forward_tokens"] == hand_count(data, res["scored"][:s + 1]), (arm, s)
        assert counts["forward_backward_tokens"] == hand_count(data, res["trained"][:s + 1]), (arm, s)
        assert counts["cost"] == counts["forward_tokens"] + RATIO * counts["forward_backward_tokens"]
        assert counts["updates"] == s + 1
    scored = hand_count(data, res["scored"])
    assert (scored > 0) == (arm == "qtuning_25x50")


@pytest.mark.parametrize("arm", list(real.ARMS))
def test_each_run_stops_at_the_first_step_that_reaches_the_budget(runs, arm):
    data, out = runs
    res = out[arm]
    costs = [c["cost"] for c in res["steps"]]
    assert costs[-1] >= data.budget > costs[-2]
    for name, at in (("half", data.budget / 2), ("final", data.budget)):
        step = res["points"][name]["step"]
        assert costs[step - 1] >= at and (step == 1 or costs[step - 2] < at), (arm, name)
    if arm == "full":
        assert len(costs) == STEPS and costs[-1] == data.budget


def test_every_arm_draws_on_the_same_data_order(runs):
    """Full-data SFT and Q-Tuning see each step's 8 items (Q-Tuning trains on those its triage
    keeps); random keeps 2 of them; the oracle 2 clean ones of a step (the steps it skips have none)."""
    data, out = runs
    kinds = [e.kind for e in data.dataset.examples]
    assert out["full"]["trained"] == data.order[:STEPS]
    qtuning = out["qtuning_25x50"]
    assert qtuning["scored"] == data.order[:len(qtuning["scored"])]
    for kept, offered in zip(qtuning["trained"], qtuning["scored"]):
        assert kept and set(kept) <= set(offered)
    for chosen, offered in zip(out["random_25"]["trained"], data.order):
        assert len(chosen) == 2 and set(chosen) <= set(offered)
    clean_steps = [[i for i in step if kinds[i] == "clean"] for step in data.order]
    for chosen, clean in zip(out["oracle_25"]["trained"], [c for c in clean_steps if c]):
        assert len(chosen) == min(2, len(clean)) and set(chosen) <= set(clean)

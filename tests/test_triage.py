"""Sample triage (SPEC section 4): hand-computed cases and hypothesis properties."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qtuning_plugin.core import triage_samples
from qtuning_plugin.core.triage import NO_TARGET, QUADRANTS

from reference import reference_pooled_triage, reference_triage

pytestmark = pytest.mark.env_independent  # torch only: `make test` only


def t(values):
    return torch.tensor(values, dtype=torch.float64)


def indices(mask):
    return mask.nonzero().squeeze(1).tolist()


def test_one_sample_per_quadrant_and_a_middle_band():
    # 0: Q1 (high PPL, high Ent), 1: Q2, 2: Q3, 3: Q4, 4-7: the middle band.
    ppl = t([10, 10, 1, 1, 5, 5, 5, 5])
    ent = t([3, 0.1, 0.1, 3, 1.5, 1.5, 1.5, 1.5])
    result = triage_samples(ppl, ent, 0.25)
    # First iterate alpha = 0.245 hits r = 2/8 = 0.25 exactly, so the search stops there.
    assert result.iterations == 1
    assert result.alpha == pytest.approx(0.245)
    # Linear-interpolation quantiles of the sorted values (worked by hand):
    assert result.ppl_hi == pytest.approx(5 + 0.285 * 5)  # q(PPL, 0.755), position 5.285
    assert result.ppl_lo == pytest.approx(1 + 0.715 * 4)  # q(PPL, 0.245), position 1.715
    assert result.ent_lo == pytest.approx(0.1 + 0.715 * 1.4)
    assert result.ent_hi == pytest.approx(1.5 + 0.285 * 1.5)
    assert indices(result.q2) == [1]
    assert indices(result.q4) == [3]
    assert indices(result.keep) == [1, 3]
    assert not result.filled.any()
    assert result.target == 2
    assert [QUADRANTS[i] for i in result.quadrant.tolist()] == ["Q1", "Q2", "Q3", "Q4"] + ["middle"] * 4


def test_bisection_narrows_alpha_until_the_ratio_is_met():
    ppl, ent = t([1, 2, 3, 4]), t([1, 3, 2, 4])
    result = triage_samples(ppl, ent, 0.5)
    # alpha = 0.245 keeps nothing (lo moves up); alpha = 0.3675 gives Q2 = {2}, Q4 = {1}.
    assert result.iterations == 2
    assert result.alpha == pytest.approx(0.3675)
    assert indices(result.q2) == [2]
    assert indices(result.q4) == [1]


def test_fill_up_adds_by_support_and_files_by_side():
    # Same rank order in PPL and Ent: no threshold pair can isolate Q2 or Q4.
    ppl, ent = t([1, 2, 4, 8]), t([1, 1.2, 3.5, 4])
    result = triage_samples(ppl, ent, 0.5)
    assert result.iterations == 10
    # p = [0, 1/7, 3/7, 1], e = [0, 1/15, 5/6, 1]: support [0, 0.076, 0.405, 0].
    assert indices(result.filled) == [1, 2]
    assert indices(result.q2) == [1]  # p - e > 0
    assert indices(result.q4) == [2]  # e - p > 0


def test_fill_up_ties_take_the_lower_index_and_count_as_q2():
    result = triage_samples(torch.full((8,), 2.0), torch.full((8,), 1.0), 0.25)
    assert indices(result.keep) == [0, 1]
    assert indices(result.q2) == [0, 1]
    assert not result.q4.any()


def test_ratio_one_keeps_every_sample_and_fills_the_rest():
    result = triage_samples(t([1, 2, 3, 4]), t([1, 3, 2, 4]), 1.0)
    assert result.keep.all()
    assert indices(result.q4) == [1]
    assert indices(result.q2) == [0, 2, 3]
    assert indices(result.filled) == [0, 3]


def test_single_sample_is_kept():
    result = triage_samples(t([3.0]), t([1.0]), 0.25)
    assert result.keep.tolist() == [True]
    assert result.q2.tolist() == [True]


def test_invalid_samples_are_neither_counted_nor_kept():
    ppl = t([10, math.nan, 10, 1, 1, 5])
    ent = t([3, math.nan, 0.1, 0.1, 3, 1.5])
    valid = torch.tensor([True, False, True, True, True, True])
    result = triage_samples(ppl, ent, 0.4, valid=valid)
    assert result.target == 2  # round(0.4 * 5)
    assert not result.keep[1]
    assert int(result.keep.sum()) >= 2
    assert result.quadrant[1] == NO_TARGET and bool((result.quadrant[valid] != NO_TARGET).all())


def test_no_valid_sample_keeps_nothing():
    result = triage_samples(t([math.nan, math.nan]), t([math.nan, math.nan]), 0.5, valid=torch.zeros(2, dtype=torch.bool))
    assert not result.keep.any() and result.target == 0 and math.isnan(result.alpha)
    assert result.quadrant.tolist() == [NO_TARGET, NO_TARGET]


@pytest.mark.parametrize(
    "kwargs, name",
    [({"sample_keep_ratio": 0.0}, "sample_keep_ratio"), ({"sample_keep_ratio": 1.5}, "sample_keep_ratio"),
     ({"max_iters": 0}, "max_bisect_iters"), ({"tol": 0.0}, "bisect_tolerance"),
     ({"earlier": t([1, 2])}, r"earlier must be \[M, 2\]")],
)
def test_bad_arguments_name_the_setting(kwargs, name):
    args = {"sample_keep_ratio": 0.5, **kwargs}
    ratio = args.pop("sample_keep_ratio")
    with pytest.raises(ValueError, match=name):
        triage_samples(t([1, 2]), t([1, 2]), ratio, **args)


def test_non_finite_statistics_of_a_valid_sample_raise():
    with pytest.raises(ValueError, match="non-finite"):
        triage_samples(t([1, math.inf]), t([1, 2]), 0.5)
    with pytest.raises(ValueError, match="an earlier sample has a non-finite"):
        triage_samples(t([1, 2]), t([1, 2]), 0.5, earlier=t([[1.0, math.nan]]))


# Few distinct values make ties and repeats common.
_values = st.one_of(
    st.sampled_from([1.0, 1.5, 2.0, 2.0, 7.0]),
    st.floats(min_value=1.0, max_value=1e4, allow_nan=False, allow_infinity=False),
)
_batches = st.integers(min_value=1, max_value=48).flatmap(
    lambda n: st.tuples(st.lists(_values, min_size=n, max_size=n), st.lists(_values, min_size=n, max_size=n))
)
_ratios = st.one_of(st.sampled_from([0.125, 0.25, 0.5, 1.0]), st.floats(min_value=0.01, max_value=1.0))


@settings(max_examples=600, deadline=None)
@given(batch=_batches, ratio=_ratios)
def test_triage_properties(batch, ratio):
    ppl, ent = t(batch[0]), t(batch[1])
    n = ppl.numel()
    result = triage_samples(ppl, ent, ratio)
    target = max(1, round(ratio * n))
    assert result.target == target
    kept, filled = int(result.keep.sum()), int(result.filled.sum())
    assert kept >= target
    assert not (result.q2 & result.q4).any()
    assert torch.equal(result.keep, result.q2 | result.q4)
    assert not (result.filled & ~result.keep).any()
    # The fill-up only tops up to K: kept = max(K, what the last bisection iterate kept).
    assert kept == max(target, kept - filled)
    # Upper bound: Q2 needs PPL above its (1 - alpha)-quantile, Q4 Ent above its own; with
    # k = floor((1 - alpha)(n - 1)) at most n - 1 - k values exceed that quantile.
    above = n - 1 - math.floor((1 - result.alpha) * (n - 1))
    assert kept <= max(target, 2 * above)
    if result.iterations < 10:  # stopped by the tolerance
        assert abs((kept - filled) / n - ratio) < 0.01
    if ratio == 1.0:
        assert result.keep.all()
    again = triage_samples(ppl.clone(), ent.clone(), ratio)
    for name in ("q2", "q4", "keep", "filled"):
        assert torch.equal(getattr(result, name), getattr(again, name))
    assert (result.alpha, result.iterations) == (again.alpha, again.iterations)


@settings(max_examples=600, deadline=None)
@given(batch=_batches, ratio=_ratios, data=st.data())
def test_triage_is_the_spec_reference(batch, ratio, data):
    """`triage_samples` against `tests/reference.py` (SPEC section 4 transcribed), exactly, with
    samples without trainable tokens (invalid) among the others."""
    n = len(batch[0])
    valid = data.draw(st.lists(st.booleans(), min_size=n, max_size=n).filter(any))
    ppl = [p if v else math.nan for p, v in zip(batch[0], valid)]
    ent = [e if v else math.nan for e, v in zip(batch[1], valid)]
    result = triage_samples(t(ppl), t(ent), ratio, valid=torch.tensor(valid))
    index = [i for i in range(n) if valid[i]]
    reference = reference_triage([ppl[i] for i in index], [ent[i] for i in index], ratio)
    for name in ("q2", "q4", "keep", "filled"):
        got = getattr(result, name)
        assert got[index].tolist() == getattr(reference, name), name
        assert not got[[i for i in range(n) if not valid[i]]].any(), name
    quadrant = result.quadrant.tolist()
    assert [QUADRANTS[quadrant[i]] for i in index] == reference.quadrant
    assert all(quadrant[i] == NO_TARGET for i in range(n) if not valid[i])
    assert (result.alpha, result.iterations, result.target) == (
        reference.alpha, reference.iterations, reference.target
    )


_earlier = st.integers(min_value=0, max_value=64).flatmap(
    lambda m: st.tuples(st.lists(_values, min_size=m, max_size=m), st.lists(_values, min_size=m, max_size=m))
)


@settings(max_examples=300, deadline=None)
@given(batch=_batches, earlier=_earlier, ratio=_ratios, hold=st.booleans(), data=st.data())
def test_pooled_triage_is_the_transcription(batch, earlier, ratio, hold, data):
    """`triage_samples` with a window's earlier samples and a held budget against
    `reference_pooled_triage` (docs/algorithm.md section 4a transcribed), exactly."""
    n = len(batch[0])
    valid = data.draw(st.lists(st.booleans(), min_size=n, max_size=n).filter(any))
    ppl = [p if v else math.nan for p, v in zip(batch[0], valid)]
    ent = [e if v else math.nan for e, v in zip(batch[1], valid)]
    result = triage_samples(t(ppl), t(ent), ratio, valid=torch.tensor(valid),
                            earlier=t(list(zip(*earlier))).reshape(-1, 2), hold_budget=hold)
    index = [i for i in range(n) if valid[i]]
    reference = reference_pooled_triage([ppl[i] for i in index], [ent[i] for i in index], *earlier, ratio, hold=hold)
    for name in ("q2", "q4", "keep", "filled", "trimmed"):
        got = getattr(result, name)
        assert got[index].tolist() == getattr(reference, name), name
        assert not got[[i for i in range(n) if not valid[i]]].any(), name
    quadrant = result.quadrant.tolist()
    assert [QUADRANTS[quadrant[i]] for i in index] == reference.quadrant
    assert (result.alpha, result.iterations, result.target, result.pooled) == (
        reference.alpha, reference.iterations, reference.target, len(index) + len(earlier[0])
    )
    if hold:
        assert int(result.keep.sum()) == result.target


@settings(max_examples=200, deadline=None)
@given(batch=_batches, ratio=_ratios)
def test_without_earlier_samples_or_a_held_budget_the_triage_is_the_papers(batch, ratio):
    """An empty window and ``hold_budget=False`` change nothing: the paper's rule, bit for bit."""
    ppl, ent = t(batch[0]), t(batch[1])
    plain = triage_samples(ppl, ent, ratio)
    empty = triage_samples(ppl, ent, ratio, earlier=torch.zeros((0, 2), dtype=torch.float64), hold_budget=False)
    for name in ("q2", "q4", "keep", "filled", "trimmed", "quadrant"):
        assert torch.equal(getattr(plain, name), getattr(empty, name)), name
    assert not plain.trimmed.any()
    assert (plain.alpha, plain.ppl_hi, plain.ppl_lo, plain.ent_lo, plain.ent_hi, plain.iterations) == (
        empty.alpha, empty.ppl_hi, empty.ppl_lo, empty.ent_lo, empty.ent_hi, empty.iterations
    )


def test_a_held_budget_trims_the_lowest_support_and_files_it_in_the_middle_band():
    """Of 8 samples at 25% (K = 2) the thresholds qualify 0 (Q2) and 7 (Q4), and 1 and 6 less far out;
    holding the budget keeps the two of highest support (0 and 7)."""
    ppl = t([10, 9, 5, 5, 5, 5, 1.5, 1])
    ent = t([0.1, 0.5, 1.5, 1.5, 1.5, 1.5, 2.5, 3])
    paper = triage_samples(ppl, ent, 0.25, max_iters=1)
    assert indices(paper.keep) == [0, 1, 6, 7]
    held = triage_samples(ppl, ent, 0.25, max_iters=1, hold_budget=True)
    assert indices(held.keep) == [0, 7] and indices(held.trimmed) == [1, 6]
    assert [QUADRANTS[q] for q in held.quadrant.tolist()] == ["Q2", "middle", *["middle"] * 4, "middle", "Q4"]


def test_earlier_samples_move_the_thresholds_but_are_never_kept():
    """A step of 4 samples alone keeps its Q2 sample; pooled with 12 earlier samples of far higher
    perplexity and lower entropy, its own samples no longer qualify and the fill-up keeps K = 1."""
    ppl, ent = t([8, 2, 2, 1]), t([0.2, 1, 1, 3])
    alone = triage_samples(ppl, ent, 0.25, hold_budget=True)
    earlier = t([[50.0, 0.01]] * 6 + [[0.5, 5.0]] * 6)
    pooled = triage_samples(ppl, ent, 0.25, earlier=earlier, hold_budget=True)
    assert alone.pooled == 4 and pooled.pooled == 16
    assert pooled.ppl_hi != alone.ppl_hi
    assert int(pooled.keep.sum()) == pooled.target == 1 and pooled.keep.shape == (4,)
    assert bool(pooled.filled.any())

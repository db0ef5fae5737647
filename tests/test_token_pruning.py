"""Q2 token pruning (SPEC section 5, eq. 7)."""

import math

import pytest
import torch

from qtuning_plugin.core import prune_tokens, token_scores

pytestmark = pytest.mark.env_independent  # torch only: `make test` only


def row(ppl_values, mask_values):
    nll = torch.tensor([[math.log(p) if p > 0 else 0.0 for p in ppl_values]], dtype=torch.float32)
    return nll, torch.tensor([mask_values])


def test_eq7_sums_both_neighbours_and_counts_zero_outside_the_span():
    # trainable positions 1..4 with token perplexities 4, 1, 2, 8
    nll, mask = row([9, 4, 1, 2, 8, 9], [False, True, True, True, True, False])
    scores = token_scores(nll, mask, context_weight=0.5)[0]
    expected = [0.5 * 4 + 0.5 * (0 + 1), 0.5 * 1 + 0.5 * (4 + 2), 0.5 * 2 + 0.5 * (1 + 8), 0.5 * 8 + 0.5 * (2 + 0)]
    assert scores[1:5].tolist() == pytest.approx(expected)
    assert math.isinf(scores[0]) and math.isinf(scores[5])


def test_highest_scores_are_pruned():
    nll, mask = row([9, 4, 1, 2, 8, 9], [False, True, True, True, True, False])
    keep = prune_tokens(nll, mask, torch.tensor([True]), 0.5, context_weight=0.5)
    # scores 2.5, 3.5, 5.5, 5.0: the two lowest (positions 1 and 2) stay.
    assert keep[0].tolist() == [False, True, True, False, False, False]


def test_reversed_ablation_keeps_the_highest_scores():
    nll, mask = row([9, 4, 1, 2, 8, 9], [False, True, True, True, True, False])
    keep = prune_tokens(nll, mask, torch.tensor([True]), 0.5, context_weight=0.5, prune_highest=False)
    assert keep[0].tolist() == [False, False, False, True, True, False]


def test_context_weight_zero_is_plain_token_perplexity():
    nll, mask = row([9, 4, 1, 2, 8, 9], [False, True, True, True, True, False])
    assert token_scores(nll, mask, context_weight=0.0)[0, 1:5].tolist() == pytest.approx([4, 1, 2, 8])
    keep = prune_tokens(nll, mask, torch.tensor([True]), 0.5, context_weight=0.0)
    assert keep[0].tolist() == [False, False, True, True, False, False]


@pytest.mark.parametrize("length, ratio, budget", [(5, 0.5, 2), (1, 0.3, 1), (10, 0.7, 7), (3, 0.1, 1), (8, 1.0, 8)])
def test_per_sample_budget_is_max_one_floor(length, ratio, budget):
    generator = torch.Generator().manual_seed(length)
    nll = torch.rand(1, 12, generator=generator)
    mask = torch.zeros(1, 12, dtype=torch.bool)
    mask[0, 2 : 2 + length] = True
    keep = prune_tokens(nll, mask, torch.tensor([True]), ratio)
    assert int(keep.sum()) == budget
    assert not (keep & ~mask).any()


def test_budget_is_per_sample_not_per_batch():
    nll = torch.rand(2, 10)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, :10] = True
    mask[1, :4] = True
    keep = prune_tokens(nll, mask, torch.tensor([True, True]), 0.5)
    assert keep.sum(dim=1).tolist() == [5, 2]


def test_ties_keep_the_earlier_position():
    nll = torch.zeros(1, 6)
    mask = torch.ones(1, 6, dtype=torch.bool)
    keep = prune_tokens(nll, mask, torch.tensor([True]), 0.5, context_weight=0.0)
    assert keep[0].tolist() == [True, True, True, False, False, False]


def test_rows_other_than_q2_are_untouched():
    nll = torch.rand(3, 8)
    mask = torch.rand(3, 8) > 0.3
    keep = prune_tokens(nll, mask, torch.tensor([False, True, False]), 0.5)
    assert torch.equal(keep[0], mask[0]) and torch.equal(keep[2], mask[2])
    assert int(keep[1].sum()) == max(1, math.floor(0.5 * int(mask[1].sum())))


@pytest.mark.parametrize("kwargs, name", [({"token_keep_ratio": 0.0}, "token_keep_ratio"),
                                          ({"context_weight": 1.5}, "context_weight")])
def test_bad_arguments_name_the_setting(kwargs, name):
    args = {"token_keep_ratio": 0.5, "context_weight": 0.5, **kwargs}
    with pytest.raises(ValueError, match=name):
        prune_tokens(torch.zeros(1, 3), torch.ones(1, 3, dtype=torch.bool), torch.tensor([True]),
                     args["token_keep_ratio"], context_weight=args["context_weight"])

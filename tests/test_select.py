"""`select`: one mini-batch through EU plane, triage and token pruning; degenerate batches."""

import math

import pytest
import torch

from qtuning_plugin import QTuningConfig, select
from qtuning_plugin.core import Segments, is_packed, sample_stats

from reference import reference_select

pytestmark = pytest.mark.env_independent  # torch only: `make test` only


def make_batch(batch=8, length=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    nll = torch.rand(batch, length, generator=generator) * 4
    entropy = torch.rand(batch, length, generator=generator) * 3
    mask = torch.zeros(batch, length, dtype=torch.bool)
    for b in range(batch):
        start = 2 + b % 3
        mask[b, start : length - b % 2] = True
    return nll, entropy, mask


@pytest.mark.parametrize(
    "config",
    [
        {"sample_keep_ratio": 0.25, "token_keep_ratio": 0.5},
        {"sample_keep_ratio": 0.5, "token_keep_ratio": 0.7, "context_weight": 0.0},
        {"sample_keep_ratio": 0.125, "token_keep_ratio": 0.3, "prune_highest_scores": False},
    ],
    ids=["25x50", "50x70-lam0", "12.5x30-reversed"],
)
def test_select_is_the_spec_reference(config):
    """Masks of `select` against `tests/reference.py` (SPEC sections 2, 4, 5 transcribed)."""
    q2_rows = q4_rows = 0
    for seed in range(8):
        nll, entropy, mask = make_batch(batch=12, length=14, seed=seed)
        mask[seed % 12] = False  # a sample without trainable positions
        selection = select(nll, entropy, mask, QTuningConfig(**config))
        keep, q2, tokens = reference_select(
            nll, entropy, mask, config["sample_keep_ratio"], config["token_keep_ratio"],
            lam=config.get("context_weight", 0.5), prune_highest=config.get("prune_highest_scores", True),
        )
        assert torch.equal(selection.sample_mask, keep), seed
        assert torch.equal(selection.q2, q2), seed
        assert torch.equal(selection.token_mask, tokens), seed
        q2_rows += int(q2.sum())
        q4_rows += int((keep & ~q2).sum())
    assert q2_rows and q4_rows  # both kinds of kept samples were compared


def test_quadrant_counts_by_hand():
    """One trainable token a sample, so that PPL = exp(nll) and Ent = entropy: sample 0 is Q1 (high
    PPL, high Ent), 1 Q2, 2 Q3 (low, low), 3 Q4, 4-7 the middle band (the hand-worked thresholds
    of `test_triage.test_one_sample_per_quadrant_and_a_middle_band`: PPL 6.425 / 3.86, Ent
    1.101 / 1.9275). Dropped: Q1, Q3 and the middle; kept: Q2 and Q4."""
    ppl = [10.0, 10.0, 1.0, 1.0, 5.0, 5.0, 5.0, 5.0]
    ent = [3.0, 0.1, 0.1, 3.0, 1.5, 1.5, 1.5, 1.5]
    nll = torch.tensor(ppl, dtype=torch.float64).log()[:, None].expand(8, 3).clone()
    entropy = torch.tensor(ent, dtype=torch.float64)[:, None].expand(8, 3).clone()
    mask = torch.zeros(8, 3, dtype=torch.bool)
    mask[:, 1] = True
    selection = select(nll, entropy, mask, QTuningConfig(sample_keep_ratio=0.25))
    stats = selection.stats
    counts = [stats[f"qtuning/samples_{q}"] for q in ("q1", "q2", "q3", "q4", "middle")]
    assert counts == [1.0, 1.0, 1.0, 1.0, 4.0]
    assert selection.quadrant.tolist() == [0, 1, 2, 3] + [4] * 4  # indices into QUADRANTS
    assert stats["qtuning/ppl_dropped_mean"] == pytest.approx((10 + 1 + 4 * 5) / 6)
    assert stats["qtuning/ent_dropped_mean"] == pytest.approx((3 + 0.1 + 4 * 1.5) / 6)
    assert stats["qtuning/ppl_kept_mean"] == pytest.approx((10 + 1) / 2)
    assert stats["qtuning/ent_kept_mean"] == pytest.approx((0.1 + 3) / 2)


def test_sample_stats_are_means_over_trainable_positions():
    nll = torch.tensor([[5.0, 1.0, 3.0], [0.0, 0.0, 0.0]])
    entropy = torch.tensor([[9.0, 2.0, 4.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[False, True, True], [False, False, False]])
    ppl, ent = sample_stats(nll, entropy, mask)
    assert ppl[0].item() == pytest.approx(math.exp(2.0))
    assert ent[0].item() == pytest.approx(3.0)
    assert math.isnan(ppl[1]) and math.isnan(ent[1])


def test_selection_masks_follow_triage_and_pruning():
    nll, entropy, mask = make_batch()
    config = QTuningConfig(sample_keep_ratio=0.25, token_keep_ratio=0.5)
    selection = select(nll, entropy, mask, config)
    keep = selection.sample_mask
    assert int(keep.sum()) >= 2
    assert not selection.token_mask[~keep].any()
    assert not (selection.token_mask & ~mask).any()
    q4 = keep & ~selection.q2
    assert torch.equal(selection.token_mask[q4], mask[q4])
    for b in selection.q2.nonzero().squeeze(1).tolist():
        assert int(selection.token_mask[b].sum()) == max(1, math.floor(0.5 * int(mask[b].sum())))


def test_statistics_for_logging():
    nll, entropy, mask = make_batch()
    stats = select(nll, entropy, mask, QTuningConfig(sample_keep_ratio=0.5)).stats
    quadrants = sum(stats[f"qtuning/samples_q{i}"] for i in range(1, 5)) + stats["qtuning/samples_middle"]
    assert quadrants == 8
    assert stats["qtuning/kept_sample_frac"] == (stats["qtuning/samples_q2"] + stats["qtuning/samples_q4"]) / 8
    assert 0.5 <= stats["qtuning/kept_token_frac"] <= 1.0
    assert stats["qtuning/trained_token_frac"] == stats["qtuning/tokens_kept"] / stats["qtuning/tokens_trainable"]
    for key in ("alpha", "ppl_hi", "ppl_lo", "ent_lo", "ent_hi", "ppl_kept_mean", "ppl_dropped_mean",
                "ent_kept_mean", "ent_dropped_mean"):
        assert math.isfinite(stats[f"qtuning/{key}"])
    assert all(isinstance(value, float) for value in stats.values())


def test_ratio_one_keeps_all_samples_and_prunes_q2_tokens_only():
    nll, entropy, mask = make_batch()
    selection = select(nll, entropy, mask, QTuningConfig(sample_keep_ratio=1.0, token_keep_ratio=1.0))
    assert selection.sample_mask.all()
    assert torch.equal(selection.token_mask, mask)


def test_samples_without_trainable_tokens_take_no_part():
    nll, entropy, mask = make_batch()
    mask[3] = False
    selection = select(nll, entropy, mask, QTuningConfig(sample_keep_ratio=1.0))
    assert not selection.sample_mask[3]
    assert selection.sample_mask.sum() == 7
    assert selection.stats["qtuning/samples_without_target"] == 1


def test_no_trainable_token_at_all_gives_empty_masks():
    nll, entropy, mask = make_batch()
    mask[:] = False
    selection = select(nll, entropy, mask, QTuningConfig())
    assert not selection.sample_mask.any() and not selection.token_mask.any()
    assert selection.stats["qtuning/trained_token_frac"] == 0.0


def test_batch_of_one_sample_is_kept_as_q2():
    nll, entropy, mask = make_batch(batch=1)
    selection = select(nll, entropy, mask, QTuningConfig(sample_keep_ratio=0.25, token_keep_ratio=0.5))
    assert selection.sample_mask.tolist() == [True]
    assert selection.q2.tolist() == [True]  # fill-up with p = e = 0 files it as Q2
    assert int(selection.token_mask.sum()) == max(1, int(mask.sum()) // 2)


def test_all_equal_statistics_keep_the_first_k():
    mask = torch.ones(8, 5, dtype=torch.bool)
    selection = select(torch.ones(8, 5), torch.ones(8, 5), mask, QTuningConfig(sample_keep_ratio=0.25))
    assert selection.sample_mask.nonzero().squeeze(1).tolist() == [0, 1]


def test_non_finite_statistics_raise_instead_of_a_nan_loss():
    nll, entropy, mask = make_batch()
    nll[2, mask[2].nonzero()[0, 0]] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        select(nll, entropy, mask, QTuningConfig())


def test_non_finite_values_at_ignored_positions_are_harmless():
    nll, entropy, mask = make_batch()
    nll[~mask] = float("nan")
    selection = select(nll, entropy, mask, QTuningConfig())
    assert selection.sample_mask.any()


def test_gathered_selection_equals_the_concatenated_batch():
    nll, entropy, mask = make_batch(batch=10)
    config = QTuningConfig(sample_keep_ratio=0.3)
    whole = select(nll, entropy, mask, config)
    # Emulate two ranks: each sees its half, the gather returns both halves' rows.
    halves = [(slice(0, 4), 0), (slice(4, 10), 4)]
    rows = torch.cat([torch.stack([*sample_stats(nll[s], entropy[s], mask[s]), mask[s].any(1).double()], 1)
                      for s, _ in halves])
    for part, offset in halves:
        local = select(nll[part], entropy[part], mask[part], config, sample_gather=lambda _rows, o=offset: (rows, o))
        assert torch.equal(local.sample_mask, whole.sample_mask[part])
        assert torch.equal(local.token_mask, whole.token_mask[part])
        assert torch.equal(local.quadrant, whole.quadrant[part]) and torch.equal(local.filled, whole.filled[part])


def test_packed_segments_round_trip():
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 0, 1, 2]])
    segments = Segments.from_position_ids(position_ids)
    assert segments.num_samples == 5 and segments.max_len == 6
    values = torch.arange(18).view(2, 9)
    unpacked = segments.unpack(values, fill=-1)
    assert unpacked[0].tolist() == [0, 1, 2, -1, -1, -1]
    assert unpacked[2].tolist() == [5, 6, 7, 8, -1, -1]
    assert unpacked[3].tolist() == [9, 10, 11, 12, 13, 14]
    assert torch.equal(segments.repack(unpacked), values)


@pytest.mark.parametrize(
    "position_ids, attention_mask, packed",
    [
        ([[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]], None, True),  # TRL padding_free / packing: no mask
        ([[0, 1, 0, 1, 0], [0, 1, 2, 3, 0]], [[1, 1, 2, 2, 0], [1, 1, 1, 1, 0]], True),  # Axolotl: sample ids
        ([[0, 1, 2, 0, 0], [0, 1, 2, 3, 4]], [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], False),  # right padding at 0
        ([[1, 1, 0, 1, 2], [0, 1, 2, 3, 4]], [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], False),  # left padding
        ([[0, 1, 2, 3, 4]], None, False),
    ],
)
def test_packing_is_recognised_from_position_ids_restarts(position_ids, attention_mask, packed):
    mask = None if attention_mask is None else torch.tensor(attention_mask)
    assert is_packed(torch.tensor(position_ids), mask) is packed

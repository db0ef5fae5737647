"""Step-scope triage (``triage_scope: step``) through the real `transformers.Trainer` loop.

References are computed without our code: the model's own logits and
`torch.nn.functional.cross_entropy`, masked by the selection the trainer reports.
"""

import logging

import pytest
import torch
from torch.utils.data import SequentialSampler
from transformers import Trainer, TrainerCallback, TrainingArguments

from qtuning_plugin._logging import LOG
from qtuning_plugin import QTuningConfig, QTuningTrainerMixin
from qtuning_plugin.modeling import unwrap_causal_lm
from qtuning_plugin.engine.passes import plan_passes

from conftest import Rows, Selections, random_batch, tiny_llama


class InOrderTrainer(QTuningTrainerMixin, Trainer):
    """Reads the dataset in order, so that a step's samples are known to the test."""

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


class Recorder(TrainerCallback):
    """Gradients before each optimizer step, and how many forwards ran with gradient."""

    def __init__(self, model):
        self.grads, self.selections, self.forwards_with_grad = [], [], []
        self.events = Selections()
        decoder = unwrap_causal_lm(model).get_decoder()
        decoder.register_forward_hook(lambda _m, _a, out: self.forwards_with_grad.append(out[0].shape[0])
                                      if torch.is_grad_enabled() else None)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()
                           if p.requires_grad and p.grad is not None})
        self.selections.append(self.events[-1].selection if self.events else None)


def train(tmp_path, rows, micro_batch_size, accumulation, steps=1, learning_rate=0.0, **config):
    model = tiny_llama()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=micro_batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=steps,
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
    )
    recorder = Recorder(model)
    trainer = InOrderTrainer(
        model=model, args=args, train_dataset=Rows(rows), callbacks=[recorder],
        qtuning_config=QTuningConfig(triage_scope="step", **config), qtuning_on_selection=recorder.events.append,
    )
    trainer.train()
    return trainer, recorder, model


def reference_loss_and_grads(rows, token_mask):
    """Mean full-logits cross-entropy over ``token_mask`` of a fresh copy of the model, and its gradients."""
    model = tiny_llama()
    model.train()
    logits = model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits.float()
    targets = torch.full_like(rows["labels"], -100)
    targets[:, :-1] = rows["labels"][:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0), reduction="none")
    loss = nll[token_mask].sum() / max(int(token_mask.sum()), 1)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return loss.detach(), grads


def losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def metric(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry]


@pytest.mark.parametrize("shape", [(1, 8), (2, 4)])
def test_accumulated_micro_batches_equal_one_large_batch(tmp_path, shape):
    rows = random_batch(batch=8, length=16, seed=31)
    config = {"sample_keep_ratio": 0.25, "token_keep_ratio": 0.5}
    big, big_rec, _ = train(tmp_path / "big", rows, 8, 1, **config)
    small, small_rec, _ = train(tmp_path / "small", rows, *shape, **config)

    big_sel, small_sel = big_rec.selections[0], small_rec.selections[0]
    assert torch.equal(big_sel.sample_mask, small_sel.sample_mask)
    assert torch.equal(big_sel.token_mask, small_sel.token_mask)
    assert int(big_sel.sample_mask.sum()) == 2  # round(0.25 * 8)

    # Two kept rows: one pass of 2 rows at mbs 8, passes of at most mbs rows otherwise.
    micro_batch_size = shape[0]
    assert big_rec.forwards_with_grad == [2]
    assert small_rec.forwards_with_grad == [micro_batch_size] * (2 // micro_batch_size)
    assert metric(small, "qtuning/training_passes") == [2 // micro_batch_size]

    expected_loss, expected_grads = reference_loss_and_grads(rows, big_sel.token_mask)
    assert losses(big)[0] == pytest.approx(expected_loss.item(), rel=1e-5)
    assert losses(small)[0] == pytest.approx(expected_loss.item(), rel=1e-5)
    assert expected_grads.keys() == big_rec.grads[0].keys() == small_rec.grads[0].keys()
    for name, grad in expected_grads.items():
        torch.testing.assert_close(big_rec.grads[0][name], grad, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(small_rec.grads[0][name], grad, atol=1e-6, rtol=1e-4)


def test_micro_batch_size_one_keeps_the_configured_fraction_of_each_step(tmp_path):
    rows = random_batch(batch=32, length=12, seed=32)
    trainer, recorder, _ = train(tmp_path, rows, 1, 8, steps=4, learning_rate=1e-2,
                                 sample_keep_ratio=0.25, token_keep_ratio=0.5)
    assert metric(trainer, "qtuning/kept_sample_frac") == [0.25] * 4
    assert metric(trainer, "qtuning/training_passes") == [2.0] * 4
    assert recorder.forwards_with_grad == [1] * 8  # 2 passes of one row per step, not 8


def test_micro_batch_scope_keeps_every_sample_at_micro_batch_size_one(tmp_path):
    """What step scope fixes: one sample per triage is always kept."""
    rows = random_batch(batch=8, length=12, seed=33)
    model = tiny_llama()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=1, gradient_accumulation_steps=8,
                             max_steps=1, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1)
    trainer = InOrderTrainer(model=model, args=args, train_dataset=Rows(rows),
                             qtuning_config=QTuningConfig(triage_scope="micro_batch", sample_keep_ratio=0.25))
    trainer.train()
    assert metric(trainer, "qtuning/kept_sample_frac") == [1.0]


def test_a_step_without_trainable_tokens_trains_nothing(tmp_path):
    rows = random_batch(batch=4, length=12, seed=34)
    rows["labels"][:] = -100
    trainer, recorder, _ = train(tmp_path, rows, 2, 2)
    assert losses(trainer) == [0.0]
    assert metric(trainer, "qtuning/training_passes") == [1.0]
    assert recorder.grads[0] and all(torch.count_nonzero(g) == 0 for g in recorder.grads[0].values())


def test_warm_start_trains_every_token_with_the_step_mean_loss(tmp_path):
    rows = random_batch(batch=8, length=16, seed=35)
    trainer, recorder, _ = train(tmp_path, rows, 2, 4, warmup_steps=1)
    expected_loss, expected_grads = reference_loss_and_grads(rows, torch.roll(rows["labels"], -1, 1) != -100)
    assert metric(trainer, "qtuning/warmup") == [1.0]
    assert losses(trainer)[0] == pytest.approx(expected_loss.item(), rel=1e-5)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(recorder.grads[0][name], grad, atol=1e-6, rtol=1e-4)


def test_a_small_triage_is_warned_about_once_counting_packed_samples(tmp_path, caplog):
    from test_trainer import _packed

    with caplog.at_level(logging.WARNING, logger=LOG.logger.name):
        train(tmp_path / "rows", random_batch(batch=8, seed=37), 1, 4, steps=2)
    assert caplog.text.count("cannot be honoured") == 1 and "a triage saw 4 samples" in caplog.text
    caplog.clear()
    # Two packed rows a step, 4 samples each: 8 samples per triage although each step has 2 rows.
    packed_rows = _packed(random_batch(batch=8, length=16, seed=38), [[0, 1, 2, 3], [4, 5, 6, 7]],
                          numbered_attention_mask=True)
    with caplog.at_level(logging.WARNING, logger=LOG.logger.name):
        trainer, _, _ = train(tmp_path / "packed", packed_rows, 1, 2)
    assert metric(trainer, "qtuning/samples_without_target") == [0.0]
    assert "cannot be honoured" not in caplog.text


def test_single_pass_scoring_needs_micro_batch_scope():
    with pytest.raises(ValueError, match="qtuning.scoring: single_pass .* `triage_scope: micro_batch`"):
        QTuningConfig(scoring="single_pass")
    assert QTuningConfig(scoring="single_pass", triage_scope="micro_batch").scoring == "single_pass"


@pytest.mark.parametrize(
    "lengths, world, rows_per_pass, capacity, expected",
    [
        # rank 0 gets units 1, 2 (lengths 9, 7); rank 1 gets 0, 3 (8, 5): two passes of one row each.
        ([8, 9, 7, 5], 2, 1, None, [[[[1]], [[2]]], [[[0]], [[3]]]]),
        # 3 rows on 2 ranks at one row per pass: rank 1 has one row for two passes.
        ([4, 6, 5], 2, 1, None, [[[[1]], [[0]]], [[[2]], []]]),
        # nothing kept: one empty pass everywhere
        ([], 2, 4, None, [[[]], [[]]]),
        # one rank: 5 rows, 2 per pass -> 3 passes of 2, 2, 1 rows
        ([1, 2, 3, 4, 5], 1, 2, None, [[[[4], [3]], [[2], [1]], [[0]]]]),
        # packed segments into rows of 10 positions, first fit by decreasing length:
        # rows [6, 4], [5, 3, 2] -> one pass of two rows
        ([2, 6, 3, 5, 4], 1, 2, 10, [[[[1, 4], [3, 2, 0]]]]),
        # two ranks: rank 0 gets 6, 4, 2 (units 1, 4, 0) -> rows [6, 4], [2]; rank 1 gets 5, 3 -> [5, 3]
        # at one row per pass: rank 0 needs 2 passes, so rank 1 gets an empty one
        ([2, 6, 3, 5, 4], 2, 1, 10, [[[[1, 4]], [[0]]], [[[3, 2]], []]]),
        # first fit into rows of 16 needs 4 rows where the original packing had 3 (one micro-batch of
        # 3 rows): the step's single pass takes all 4 rather than a second pass the step has no slot for
        ([5, 7, 4, 9, 6, 3, 8, 5], 1, 3, 16, [[[[3, 1], [6, 4], [0, 7, 2], [5]]]]),
    ],
)
def test_plan_passes_deals_units_by_length_and_gives_every_rank_the_same_pass_count(
    lengths, world, rows_per_pass, capacity, expected
):
    max_passes = 1 if capacity == 16 else None
    assert [plan_passes(lengths, world, rank, rows_per_pass, capacity, max_passes) for rank in range(world)] == expected


def test_packed_rows_select_and_train_as_their_unpacked_samples_in_fewer_rows(tmp_path):
    """Packed rows (position_ids resets, no attention mask: TRL's padding-free format): the step's
    segments are triaged as samples, and the kept ones are packed into as few rows as they fill."""
    from test_trainer import _packed

    rows = random_batch(batch=8, length=16, seed=36)
    config = {"sample_keep_ratio": 0.25, "token_keep_ratio": 0.5}
    unpacked, unpacked_rec, _ = train(tmp_path / "unpacked", rows, 8, 1, **config)

    packed_rows = _packed(rows, [[0, 1, 2], [3, 4], [5, 6, 7]])
    model = tiny_llama()
    args = TrainingArguments(output_dir=str(tmp_path / "packed"), per_device_train_batch_size=1,
                             gradient_accumulation_steps=3, max_steps=1, learning_rate=0.0, max_grad_norm=0.0,
                             logging_steps=1, report_to=[], use_cpu=True, save_strategy="no")
    recorder = Recorder(model)
    packed = InOrderTrainer(model=model, args=args, train_dataset=Rows(packed_rows), callbacks=[recorder],
                            qtuning_config=QTuningConfig(triage_scope="step", **config),
                            qtuning_on_selection=recorder.events.append)
    packed.train()

    reference, selection = unpacked_rec.selections[0], recorder.selections[0]
    samples = ~torch.isnan(selection.ppl)  # the padding tails are segments without targets
    assert int(samples.sum()) == 8
    assert torch.equal(selection.sample_mask[samples], reference.sample_mask)
    assert losses(packed)[0] == pytest.approx(losses(unpacked)[0], rel=1e-5)
    for name, grad in unpacked_rec.grads[0].items():
        torch.testing.assert_close(recorder.grads[0][name], grad, atol=1e-6, rtol=1e-4)
    # Both kept segments (at most 16 positions each) fit one packed row: one pass of one row.
    assert recorder.forwards_with_grad == [1]

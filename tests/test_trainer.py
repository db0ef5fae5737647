"""The micro-batch-scope training step (QTuningTrainerMixin over the engine): two-pass vs single-pass,
packing, gradient accumulation, warm start, empty micro-batches and evaluation."""

import logging

import pytest
import torch
from transformers import Trainer, TrainingArguments

from qtuning_plugin._logging import LOG
from qtuning_plugin import QTuningConfig, QTuningTrainerMixin
from qtuning_plugin.modeling import final_hidden_states, lm_head_parameters, shifted_targets, unwrap_causal_lm
from qtuning_plugin.ops.backends import TORCH
from qtuning_plugin.engine import kept_token_loss

from conftest import Rows, Selections, random_batch, tiny_llama


class QTuningTrainer(QTuningTrainerMixin, Trainer):
    pass


def make_trainer(tmp_path, model, dataset=None, **config):
    """A trainer on 8-row micro-batches; triage per micro-batch unless ``triage_scope`` says otherwise."""
    config.setdefault("triage_scope", "micro_batch")
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        learning_rate=1e-2,
        max_steps=4,
        lr_scheduler_type="constant",
        dataloader_drop_last=True,
    )
    return QTuningTrainer(model=model, args=args, train_dataset=dataset, qtuning_config=QTuningConfig(**config))


def lora_grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def loss_and_grads(trainer, model, inputs):
    model.zero_grad()
    model.train()
    loss = trainer.compute_loss(model, inputs)
    loss.backward()
    return loss.detach(), lora_grads(model)


def test_two_pass_and_single_pass_agree(tmp_path, model):
    inputs = random_batch()
    config = {"sample_keep_ratio": 0.5, "token_keep_ratio": 0.5}
    two = make_trainer(tmp_path, model, scoring="two_pass", **config)
    one = make_trainer(tmp_path, model, scoring="single_pass", **config)
    events_two, events_one = Selections.of(two), Selections.of(one)
    loss_two, grads_two = loss_and_grads(two, model, inputs)
    loss_one, grads_one = loss_and_grads(one, model, inputs)
    sel_two, sel_one = events_two.last, events_one.last
    assert torch.equal(sel_two.sample_mask, sel_one.sample_mask)
    assert torch.equal(sel_two.token_mask, sel_one.token_mask)
    assert sel_two.sample_mask.sum() < 8  # some samples really are dropped
    torch.testing.assert_close(loss_two, loss_one, atol=1e-5, rtol=1e-5)
    assert grads_two.keys() == grads_one.keys() and grads_two
    for name in grads_two:
        torch.testing.assert_close(grads_two[name], grads_one[name], atol=1e-5, rtol=1e-4)


def test_two_pass_loss_is_the_mean_over_kept_tokens_of_kept_rows(tmp_path, model):
    inputs = random_batch(seed=1)
    trainer = make_trainer(tmp_path, model, sample_keep_ratio=0.25, token_keep_ratio=0.5)
    events = Selections.of(trainer)
    model.train()
    loss = trainer.compute_loss(model, inputs)
    selection = events.last
    # Reference: the full-logits cross-entropy of a plain forward, masked by the selection.
    targets = shifted_targets(inputs["labels"])
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits.double()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0), reduction="none")
    expected = nll[selection.token_mask].mean()
    torch.testing.assert_close(loss.double(), expected, atol=1e-5, rtol=1e-5)


def test_two_pass_runs_backward_on_the_kept_rows_only(tmp_path, model):
    inputs = random_batch(seed=2)
    trainer = make_trainer(tmp_path, model, sample_keep_ratio=0.25)
    events = Selections.of(trainer)
    seen = []
    decoder = unwrap_causal_lm(model).get_decoder()
    handle = decoder.register_forward_hook(lambda _m, _a, out: seen.append((out[0].shape[0], torch.is_grad_enabled())))
    model.train()
    trainer.compute_loss(model, inputs)
    handle.remove()
    kept = int(events.last.sample_mask.sum())
    assert seen == [(8, False), (kept, True)]
    assert 2 <= kept < 8


def _packed(inputs, rows_of_segments, numbered_attention_mask=False):
    """Pack right-padded rows into rows of concatenated samples, with position_ids resets; with
    ``numbered_attention_mask`` also Axolotl's attention mask (1, 2, ... per sample, 0 at padding)."""
    packed_rows = []
    for row in rows_of_segments:
        ids, labels, positions = [], [], []
        for b in row:
            used = int(inputs["attention_mask"][b].sum())
            ids.append(inputs["input_ids"][b, :used])
            labels.append(inputs["labels"][b, :used])
            positions.append(torch.arange(used))
        packed_rows.append((torch.cat(ids), torch.cat(labels), torch.cat(positions)))
    width = max(r[0].numel() for r in packed_rows)
    out = {"input_ids": [], "labels": [], "position_ids": [], "attention_mask": []}
    for ids, labels, positions in packed_rows:
        pad = width - ids.numel()
        out["input_ids"].append(torch.cat([ids, ids.new_zeros(pad)]))
        out["labels"].append(torch.cat([labels, labels.new_full((pad,), -100)]))
        out["position_ids"].append(torch.cat([positions, torch.arange(pad)]))
        out["attention_mask"].append(torch.cat([(positions == 0).cumsum(0), positions.new_zeros(pad)]))
    if not numbered_attention_mask:
        del out["attention_mask"]
    return {key: torch.stack(value) for key, value in out.items()}


@pytest.mark.parametrize("scoring", ["two_pass", "single_pass"])
def test_packed_rows_give_the_statistics_selection_and_loss_of_the_unpacked_samples(tmp_path, model, scoring):
    inputs = random_batch(batch=6, seed=3)
    config = {"sample_keep_ratio": 0.5, "token_keep_ratio": 0.5, "scoring": scoring}
    unpacked = make_trainer(tmp_path, model, **config)
    unpacked_events = Selections.of(unpacked)
    model.train()
    reference_loss = unpacked.compute_loss(model, inputs)
    reference = unpacked_events.last

    packed_trainer = make_trainer(tmp_path, model, **config)
    packed_events = Selections.of(packed_trainer)
    packed = _packed(inputs, [[0, 1, 2], [3, 4], [5]])
    loss = packed_trainer.compute_loss(model, packed)
    selection = packed_events.last
    # Segments come in row order (0, 1, 2 | 3, 4 | 5); without an attention mask the padding
    # tails are segments without targets.
    samples = ~torch.isnan(selection.ppl)
    assert int(samples.sum()) == 6
    torch.testing.assert_close(selection.ppl[samples], reference.ppl, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(selection.ent[samples], reference.ent, atol=1e-4, rtol=1e-4)
    assert torch.equal(selection.sample_mask[samples], reference.sample_mask)
    assert not selection.sample_mask[~samples].any()
    torch.testing.assert_close(loss, reference_loss, atol=1e-5, rtol=1e-5)


def test_gradient_accumulation_is_the_mean_of_micro_batch_means(tmp_path, model):
    """k accumulated micro-batches == one k-times-larger batch whose loss is the mean of the
    micro-batch losses, each over its own kept tokens (triage per micro-batch)."""
    micro = [random_batch(batch=4, seed=10), random_batch(batch=4, seed=11)]
    trainer = make_trainer(tmp_path, model, sample_keep_ratio=0.5, token_keep_ratio=0.5)
    trainer.current_gradient_accumulation_steps = 2
    model.zero_grad()
    events = Selections.of(trainer)
    for inputs in micro:
        trainer.training_step(model, inputs, num_items_in_batch=torch.tensor(100))
    masks = [event.selection.token_mask for event in events]
    accumulated = lora_grads(model)

    model.zero_grad()
    big = {key: torch.cat([m[key] for m in micro]) for key in micro[0]}
    hidden = final_hidden_states(model, big)
    weight, bias = lm_head_parameters(unwrap_causal_lm(model))
    targets = shifted_targets(big["labels"])
    losses = [kept_token_loss(TORCH, hidden[4 * i : 4 * i + 4], weight, bias, targets[4 * i : 4 * i + 4], masks[i])
              for i in range(2)]
    (sum(losses) / 2).backward()
    for name, grad in lora_grads(model).items():
        torch.testing.assert_close(accumulated[name], grad, atol=1e-5, rtol=1e-4)


def test_a_micro_batch_without_trainable_tokens_gives_zero_loss_and_gradients(tmp_path, model, caplog):
    inputs = random_batch(seed=4)
    inputs["labels"][:] = -100
    for scoring in ("two_pass", "single_pass"):
        trainer = make_trainer(tmp_path, model, scoring=scoring)
        with caplog.at_level(logging.WARNING, logger=LOG.logger.name):
            loss, grads = loss_and_grads(trainer, model, inputs)
        assert loss.item() == 0.0
        assert grads and all(torch.count_nonzero(g) == 0 for g in grads.values())
        assert "without any trainable token" in caplog.text


def test_warm_start_trains_on_everything_for_exactly_n_steps(tmp_path, model):
    dataset = Rows(random_batch(batch=32, seed=5))
    trainer = make_trainer(tmp_path, model, dataset, warmup_steps=2, sample_keep_ratio=0.25)
    trainer.train()
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(history) == 4
    assert [entry.get("qtuning/warmup") for entry in history] == [1.0, 1.0, None, None]
    assert "qtuning/kept_sample_frac" not in history[1]
    assert all(0.25 <= entry["qtuning/kept_sample_frac"] < 1.0 for entry in history[2:])
    assert history[1]["qtuning/tokens_saved_frac_cumulative"] == 0.0
    assert 0.0 < history[-1]["qtuning/tokens_saved_frac_cumulative"] < 0.75


def test_evaluation_and_disabled_training_use_the_plain_loss(tmp_path, model):
    inputs = random_batch(seed=6)
    plain = model(**inputs).loss
    trainer = make_trainer(tmp_path, model)
    model.eval()
    torch.testing.assert_close(trainer.compute_loss(model, inputs), plain)
    model.train()
    disabled = make_trainer(tmp_path, model, enabled=False)
    torch.testing.assert_close(disabled.compute_loss(model, inputs), plain)
    assert trainer.compute_loss(model, inputs).item() != pytest.approx(plain.item())


def test_full_fine_tuning_without_lora(tmp_path):
    model = tiny_llama(lora=False)
    inputs = random_batch(seed=7)
    trainer = make_trainer(tmp_path, model, sample_keep_ratio=0.5)
    loss, grads = loss_and_grads(trainer, model, inputs)
    assert torch.isfinite(loss)
    assert torch.count_nonzero(grads["lm_head.weight"]) > 0
    assert torch.count_nonzero(grads["model.embed_tokens.weight"]) > 0

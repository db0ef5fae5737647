"""Q-Tuning training against references from outside our code: the model's own loss and logits
(plain transformers and torch) and a plain `transformers.Trainer`'s update.

Each test runs ``Trainer.train()`` for one optimizer step (plain SGD, learning rate 1, no
clipping), so that the parameter change is minus the gradient, and reads what the trainer
logged; nothing here depends on how the mixin splits the step into calls.
"""

import pytest
import torch
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments

from qtuning_plugin import QTuningConfig, QTuningTrainerMixin

from conftest import Rows, SCORINGS, Selections, random_batch, tiny_llama

ALL = {"sample_keep_ratio": 1.0, "token_keep_ratio": 1.0}


class QTuningTrainer(QTuningTrainerMixin, Trainer):
    pass



def sgd_args(tmp_path, **overrides):
    """One optimizer step of plain SGD (lr 1, no clipping), batches in dataset order."""
    args = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        max_steps=1,
        optim="sgd",
        learning_rate=1.0,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        train_sampling_strategy="sequential",
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
    )
    return TrainingArguments(**{**args, **overrides})


def trainable(model):
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def one_step(trainer):
    """Train one step; the logged loss and minus the parameter change (the gradient at lr 1)."""
    before = trainable(trainer.model)
    trainer.train()
    after = trainable(trainer.model)
    loss = next(entry["loss"] for entry in trainer.state.log_history if "loss" in entry)
    return loss, {name: before[name] - after[name] for name in before}


def own_loss_and_grads(batch, *, label_smoothing=0.0):
    """The model's own loss (transformers' causal-LM loss; transformers' LabelSmoother for
    ``label_smoothing``) on ``batch`` and its gradients, from a fresh model."""
    model = tiny_llama(seed=0)
    model.train()
    outputs = model(**{key: value for key, value in batch.items() if key != "labels"} if label_smoothing else batch)
    if label_smoothing:
        from transformers.trainer_pt_utils import LabelSmoother

        loss = LabelSmoother(epsilon=label_smoothing)(outputs, batch["labels"], shift_labels=True)
    else:
        loss = outputs.loss
    loss.backward()
    return loss.item(), {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


def assert_update_is(delta, grads):
    assert delta.keys() == grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(delta[name], grad, atol=1e-6, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def batch_with_a_row_without_targets(seed=0):
    batch = random_batch(batch=8, length=16, seed=seed)
    batch["labels"][5] = -100  # takes no part: no loss, no triage
    return batch


@pytest.mark.parametrize("scoring", SCORINGS, ids=list(SCORINGS))
def test_keep_ratio_one_trains_on_the_models_own_loss(tmp_path, scoring):
    batch = batch_with_a_row_without_targets()
    trainer = QTuningTrainer(
        model=tiny_llama(seed=0), args=sgd_args(tmp_path), train_dataset=Rows(batch),
        qtuning_config=QTuningConfig(**SCORINGS[scoring], **ALL),
    )
    loss, delta = one_step(trainer)
    expected_loss, grads = own_loss_and_grads(batch)
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    assert_update_is(delta, grads)


def test_label_smoothing_is_transformers_label_smoother(tmp_path):
    batch = batch_with_a_row_without_targets(seed=1)
    trainer = QTuningTrainer(
        model=tiny_llama(seed=0), args=sgd_args(tmp_path, label_smoothing_factor=0.1), train_dataset=Rows(batch),
        qtuning_config=QTuningConfig(**ALL),
    )
    loss, delta = one_step(trainer)
    expected_loss, grads = own_loss_and_grads(batch, label_smoothing=0.1)
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    assert_update_is(delta, grads)


def equal_token_rows(rows=8, length=12, prompt=3, seed=2):
    """Unpadded rows with the same number of trainable targets each (``length - prompt``)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 101, (rows, length), generator=generator)
    labels = input_ids.clone()
    labels[:, :prompt] = -100
    return {"input_ids": input_ids, "labels": labels, "attention_mask": torch.ones_like(input_ids)}


@pytest.mark.parametrize("scoring", list(SCORINGS))
@pytest.mark.parametrize("accepts_loss_kwargs", [True, False], ids=["num_items_in_batch", "no_loss_kwargs"])
def test_gradient_accumulation_makes_the_plain_trainers_update(tmp_path, accepts_loss_kwargs, scoring):
    """4 accumulated micro-batches of 2 rows, equal trainable-token counts (so that the mean of the
    micro-batch means is the mean over the step's tokens): the plain Trainer's update and loss,
    whether or not transformers normalises by ``num_items_in_batch`` itself, in each triage
    scope and scoring."""
    dataset = Rows(equal_token_rows())
    results = []
    config = QTuningConfig(**SCORINGS[scoring], **ALL)
    for cls, extra in ((Trainer, {}), (QTuningTrainer, {"qtuning_config": config})):
        args = sgd_args(tmp_path / cls.__name__, per_device_train_batch_size=2, gradient_accumulation_steps=4)
        trainer = cls(model=tiny_llama(seed=0), args=args, train_dataset=dataset, **extra)
        trainer.model_accepts_loss_kwargs = accepts_loss_kwargs
        results.append(one_step(trainer))
    (plain_loss, plain_delta), (loss, delta) = results
    assert loss == pytest.approx(plain_loss, rel=1e-5)
    assert_update_is(delta, plain_delta)


def test_selection_statistics_are_those_of_the_models_logits(tmp_path):
    """Every sample's PPL is exp of its mean cross-entropy (plain `F.cross_entropy` on the model's
    logits) and its Ent the mean full-vocabulary entropy (float64), over its trainable targets."""
    batch = batch_with_a_row_without_targets(seed=3)
    trainer = QTuningTrainer(
        model=tiny_llama(seed=0), args=sgd_args(tmp_path), train_dataset=Rows(batch),
        qtuning_config=QTuningConfig(sample_keep_ratio=0.5),
    )
    events = Selections.of(trainer)
    trainer.train()
    selection = events.last

    with torch.no_grad():
        logits = tiny_llama(seed=0)(**batch).logits.double()[:, :-1]
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
    logp = logits.log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    for row in range(8):
        if not mask[row].any():
            assert torch.isnan(selection.ppl[row]) and torch.isnan(selection.ent[row])
            continue
        ppl = torch.exp(nll[row][mask[row]].mean())
        ent = entropy[row][mask[row]].mean()
        torch.testing.assert_close(selection.ppl[row], ppl, atol=0, rtol=2e-5)
        torch.testing.assert_close(selection.ent[row], ent, atol=0, rtol=2e-5)


def test_packed_rows_train_on_each_samples_own_loss(tmp_path):
    """Samples packed into rows (position_ids restart; every token labelled, as in pretraining-
    style packing, so that a row's boundary targets matter): with both keep ratios at 1 the loss
    is each sample's own cross-entropy through the model alone, over all the step's targets, and
    the target across a boundary (the next sample's first token) is not trained on."""
    generator = torch.Generator().manual_seed(4)
    lengths = [[5, 7, 4], [9, 6], [3, 8, 5]]
    samples = [[torch.randint(3, 101, (n,), generator=generator) for n in row] for row in lengths]
    width = max(sum(row) for row in lengths)
    batch = {"input_ids": [], "labels": [], "position_ids": []}
    for row in samples:
        pad = width - sum(len(s) for s in row)
        ids = torch.cat([*row, torch.zeros(pad, dtype=torch.long)])
        batch["input_ids"].append(ids)
        batch["labels"].append(torch.cat([*row, torch.full((pad,), -100)]))
        batch["position_ids"].append(torch.cat([torch.arange(len(s)) for s in row] + [torch.arange(pad)]))
    batch = {key: torch.stack(value) for key, value in batch.items()}

    trainer = QTuningTrainer(
        model=tiny_llama(seed=0), args=sgd_args(tmp_path, per_device_train_batch_size=3),
        train_dataset=Rows(batch), qtuning_config=QTuningConfig(**ALL),
    )
    loss, delta = one_step(trainer)

    model = tiny_llama(seed=0)
    model.train()
    total = sum(model(input_ids=s[None], labels=s[None]).loss * (len(s) - 1) for row in samples for s in row)
    expected = total / sum(len(s) - 1 for row in samples for s in row)
    expected.backward()
    assert loss == pytest.approx(expected.item(), rel=1e-5)
    assert_update_is(delta, {name: p.grad for name, p in model.named_parameters() if p.requires_grad})

"""The wrapped trainer's settings under Q-Tuning: refused at start-up with a message naming the
setting (`qtuning_plugin.hf.rules`), or honoured (gradient checkpointing, no warning)."""

import warnings

import pytest
import torch
from transformers import Trainer, TrainingArguments
from transformers.modeling_layers import GradientCheckpointingLayer

from qtuning_plugin import QTuningConfig, QTuningTrainerMixin
from qtuning_plugin.hf.rules import check_trainer

from conftest import Rows, SCORINGS, random_batch, tiny_llama


class QTuningTrainer(QTuningTrainerMixin, Trainer):
    pass



def build(tmp_path, model=None, config=None, **settings):
    defaults = dict(output_dir=str(tmp_path), report_to=[], use_cpu=True, save_strategy="no", per_device_train_batch_size=4)
    args = TrainingArguments(**{**defaults, **settings})
    return QTuningTrainer(
        model=model or tiny_llama(), args=args, train_dataset=Rows(random_batch()),
        qtuning_config=config or QTuningConfig(),
    )


def plain_cross_entropy(outputs, labels, num_items_in_batch=None):
    logits = outputs.logits[:, :-1].flatten(0, 1)
    return torch.nn.functional.cross_entropy(logits, labels[:, 1:].flatten(), reduction="sum") / num_items_in_batch


def test_compute_loss_func_is_refused_with_gradient_accumulation(tmp_path):
    """A loss of the full logits that Q-Tuning's would silently replace (with gradient
    accumulation the update was also 4x too large: the Trainer leaves the division by the
    accumulation steps to a compute_loss_func); refused at start-up, and only under Q-Tuning."""
    args = TrainingArguments(
        output_dir=str(tmp_path), report_to=[], use_cpu=True, save_strategy="no", gradient_accumulation_steps=4
    )
    with pytest.raises(ValueError, match="compute_loss_func"):
        QTuningTrainer(model=tiny_llama(), args=args, compute_loss_func=plain_cross_entropy,
                       qtuning_config=QTuningConfig())
    disabled = QTuningTrainer(model=tiny_llama(), args=args, compute_loss_func=plain_cross_entropy,
                              qtuning_config=QTuningConfig(enabled=False))
    assert disabled.compute_loss_func is plain_cross_entropy  # without Q-Tuning nothing is refused


def test_label_smoothing_out_of_range_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"label_smoothing_factor: 1\.5: must be in \[0, 1\]"):
        build(tmp_path, label_smoothing_factor=1.5)


def test_moe_router_auxiliary_loss_is_refused(tmp_path):
    model = tiny_llama()
    model.get_base_model().config.output_router_logits = True
    with pytest.raises(ValueError, match="router_aux_loss_coef"):
        build(tmp_path, model=model)


def test_context_parallelism_is_refused(tmp_path, monkeypatch):
    from accelerate.parallelism_config import ParallelismConfig

    trainer = build(tmp_path)
    # accelerate reads it from its process-wide state, which a single process cannot set up.
    monkeypatch.setattr(type(trainer.accelerator), "parallelism_config", property(lambda _: ParallelismConfig(cp_size=2)))
    with pytest.raises(ValueError, match="cp_size/sp_size: '2/1': context/sequence parallelism splits each sample"):
        check_trainer(trainer)


@pytest.mark.parametrize("scoring", SCORINGS, ids=list(SCORINGS))
def test_gradient_checkpointing_scores_without_warnings(tmp_path, scoring):
    """transformers' reentrant checkpointing warns "None of the inputs have requires_grad=True"
    on a forward without gradient: the scoring pass runs without checkpointing, and the
    training forward still checkpoints, to the same loss. One step through `Trainer.train()`."""
    config = QTuningConfig(**SCORINGS[scoring], sample_keep_ratio=0.5)
    settings = {"max_steps": 1, "per_device_train_batch_size": 8, "logging_steps": 1}
    reference = build(tmp_path / "plain", config=config, **settings)
    reference.train()

    trainer = build(
        tmp_path / "checkpointed", config=config, gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": True}, **settings,
    )
    layer = next(m for m in trainer.model.modules() if isinstance(m, GradientCheckpointingLayer))
    calls = []
    hook = layer.register_forward_pre_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    hook.remove()
    assert not [w for w in caught if "requires_grad" in str(w.message)], [str(w.message) for w in caught]
    assert layer.gradient_checkpointing
    # The forward passes (scoring and training, or the single one), plus the recomputation of the
    # checkpointed training forward during the backward, the only call with gradient.
    assert calls == [False] * (1 if scoring == "single_pass" else 2) + [True]
    losses = [next(e["loss"] for e in t.state.log_history if "loss" in e) for t in (reference, trainer)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)

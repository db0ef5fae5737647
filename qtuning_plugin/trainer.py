"""The Q-Tuning training step as a `transformers.Trainer` mixin.

    class MyTrainer(QTuningTrainerMixin, Trainer): ...
    trainer = MyTrainer(model=model, args=args, ..., qtuning_config=QTuningConfig())

Axolotl's trainer runs this same code (`qtuning_plugin.axolotl.plugin`).

One training micro-batch (SPEC section 7):

* two_pass (default without packing): a gradient-free forward over the whole
  micro-batch scores every token; triage and Q2 token pruning pick the kept
  samples and tokens; forward + backward then runs on the kept rows only.
* single_pass (sample packing): one forward with gradient; the statistics come
  from its detached hidden states, each packed segment is triaged as a sample,
  and pruning is loss masking.

Loss normalisation: the loss of a micro-batch is the mean cross-entropy over
its kept tokens. Over gradient accumulation and data-parallel ranks the update
is the mean of the micro-batch losses (each micro-batch weighs the same,
whatever its number of kept tokens); transformers' ``num_items_in_batch`` is
not used, since the kept-token count of later micro-batches is unknown until
they are scored. Triage runs per micro-batch (over every rank's micro-batch
in data-parallel training).
"""

from __future__ import annotations

import os
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from qtuning_plugin._logging import LOG
from qtuning_plugin.config import QTuningConfig
from qtuning_plugin.core import Segments, is_packed, select
from qtuning_plugin.distributed import default_sample_gather
from qtuning_plugin.history import QTuningHistory
from qtuning_plugin.modeling import head_forward, shifted_targets
from qtuning_plugin.ops.backends import Backend, resolve_backend
from qtuning_plugin.trainer_checks import check_trainer_settings


def kept_token_loss(
    backend: Backend,
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    targets: Tensor,
    token_mask: Tensor,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Mean cross-entropy (nats) over the kept tokens.

    Args:
        hidden: ``[B, T, H]`` final hidden states (with gradient).
        weight, bias: the LM head, ``[V, H]`` and ``[V]`` or None.
        targets: ``[B, T]`` int64, already shifted.
        token_mask: ``[B, T]`` bool, the kept tokens.
        label_smoothing: in [0, 1], as transformers' ``label_smoothing_factor``.

    Returns:
        A scalar; 0 with zero gradients when no token is kept.
    """
    kept = int(token_mask.sum())
    # k-bit training keeps the head in float32 while the body may run in bf16.
    rows = hidden[token_mask].to(weight.dtype)
    loss_sum = backend.linear_cross_entropy(
        rows, weight, targets[token_mask], bias=bias, reduction="sum", label_smoothing=label_smoothing
    )
    return loss_sum / max(kept, 1)


def _right_padded_length(attention_mask: Optional[Tensor]) -> Optional[int]:
    """The columns in use by a right-padded ``[B, T]`` attention mask, or None if not right-padded."""
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    mask = attention_mask.bool()
    if bool((mask[:, 1:] & ~mask[:, :-1]).any()):
        return None
    return max(int(mask.sum(dim=1).max()), 1)


class QTuningTrainerMixin:
    """Replaces the training loss of a `transformers.Trainer` with Q-Tuning's.

    Put it first among the bases. The settings come from the ``qtuning_config``
    keyword (a `QTuningConfig` or a dict), else from ``args.qtuning`` (how
    Axolotl passes them), else the defaults. Evaluation, and training with
    ``enabled=False``, use the wrapped trainer's own loss untouched.
    """

    def __init__(self, *args: Any, qtuning_config: Union[QTuningConfig, dict, None] = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        from_args = qtuning_config is None
        if from_args:
            qtuning_config = getattr(self.args, "qtuning", None) or {}
        self.qtuning_config = QTuningConfig.model_validate(
            qtuning_config.model_dump() if isinstance(qtuning_config, QTuningConfig) else qtuning_config
        )
        self._qtuning_backend: Optional[Backend] = None
        # Metrics, plot data and checkpointed state, in one place (qtuning_plugin.history).
        self.qtuning_history = QTuningHistory()
        if self.qtuning_config.enabled:
            check_trainer_settings(self, self.qtuning_config.scoring)
            if not from_args:  # Axolotl's plugin has logged it already, before the model loaded
                LOG.info("Q-Tuning is active: %s", self.qtuning_config.describe())
            from qtuning_plugin.callbacks import QTuningPlotCallback

            self.add_callback(QTuningPlotCallback(self.qtuning_history, self.qtuning_config.plot_every_n_steps))

    # ------------------------------------------------------------------ loss
    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch=None):
        if not (self.qtuning_config.enabled and model.training):
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        loss = self.qtuning_loss(model, self.qtuning_prepare_inputs(model, inputs, num_items_in_batch))
        # Trainer.training_step divides by the accumulation steps only where it expects a loss
        # not normalised by num_items_in_batch (this condition); ours is a mean, so divide elsewhere.
        trainer_divides = (
            not self.model_accepts_loss_kwargs or num_items_in_batch is None
        ) and self.compute_loss_func is None
        if not trainer_divides:
            loss = loss / self.current_gradient_accumulation_steps
        return (loss, None) if return_outputs else loss

    def qtuning_prepare_inputs(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> dict[str, Any]:
        """A training micro-batch as the wrapped trainer's ``compute_loss`` would hand it to the model.

        Here unchanged; the Axolotl trainer runs Axolotl's own preparation (its token counts for
        throughput, model-specific input fix-ups).
        """
        return inputs

    def qtuning_loss(self, model: nn.Module, inputs: dict[str, Any]) -> Tensor:
        """The Q-Tuning loss of one training micro-batch (see the module docstring)."""
        config = self.qtuning_config
        labels = inputs["labels"]
        packed = self._is_packed(inputs)
        targets = shifted_targets(labels, inputs.get("position_ids") if packed else None)
        mask = targets != -100
        if self._qtuning_backend is None:
            self._qtuning_backend = resolve_backend(config.backend, labels.device)
            LOG.info(
                "Q-Tuning fused cross-entropy backend: %s; scoring %s",
                self._qtuning_backend.name,
                self._scoring(packed),
            )
        backend = self._qtuning_backend
        smoothing = self.label_smoother.epsilon if self.label_smoother is not None else 0.0
        if not bool(mask.any()):
            LOG.warning("qtuning: a micro-batch without any trainable token; its loss is 0")

        # Statistics and loss run in place of the LM head, inside the model's forward
        # (`head_forward`), where FSDP/ZeRO-3 hold the head's full weight.
        if self.state.global_step < config.warmup_steps:
            self._record({"qtuning/warmup": 1.0}, mask, mask)
            return head_forward(model, inputs, lambda h, w, b: kept_token_loss(backend, h, w, b, targets, mask, smoothing))

        if self._scoring(packed) == "single_pass":
            segments = Segments.from_position_ids(inputs["position_ids"]) if packed else None

            def select_and_loss(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
                _, token_mask = self._select(backend, hidden.detach(), weight, bias, targets, mask, segments)
                return kept_token_loss(backend, hidden, weight, bias, targets, token_mask, smoothing)

            return head_forward(model, inputs, select_and_loss)

        with torch.no_grad():
            sample_mask, token_mask = head_forward(
                model, inputs, lambda h, w, b: self._select(backend, h, w, b, targets, mask, None)
            )
        rows = sample_mask.nonzero().squeeze(1)
        if rows.numel() == 0:  # nothing trainable: a zero loss that still reaches every parameter
            rows = rows.new_zeros(1)
        batch = labels.shape[0]
        sub_inputs = {
            key: value[rows] for key, value in inputs.items() if torch.is_tensor(value) and value.shape[:1] == (batch,)
        }
        sub_targets, sub_mask = targets[rows], token_mask[rows]
        length = _right_padded_length(sub_inputs.get("attention_mask"))
        if length is not None and length < labels.shape[1]:
            sub_inputs = {key: value[:, :length] if value.dim() >= 2 else value for key, value in sub_inputs.items()}
            sub_targets, sub_mask = sub_targets[:, :length], sub_mask[:, :length]
        return head_forward(
            model, sub_inputs, lambda h, w, b: kept_token_loss(backend, h, w, b, sub_targets, sub_mask, smoothing)
        )

    def _is_packed(self, inputs: dict[str, Any]) -> bool:
        position_ids = inputs.get("position_ids")
        return position_ids is not None and is_packed(position_ids, inputs.get("attention_mask"))

    def _scoring(self, packed: bool) -> str:
        scoring = self.qtuning_config.scoring
        if scoring == "two_pass" and packed:
            raise ValueError("qtuning.scoring: two_pass needs one sample per row; use single_pass or auto with sample packing")
        if scoring == "auto":
            return "single_pass" if packed else "two_pass"
        return scoring

    def _select(
        self,
        backend: Backend,
        hidden: Tensor,
        weight: Tensor,
        bias: Optional[Tensor],
        targets: Tensor,
        mask: Tensor,
        segments: Optional[Segments],
    ) -> tuple[Tensor, Tensor]:
        """Score every token without gradient, then triage; ``(sample_mask [B], token_mask [B, T])``.

        With ``segments`` the samples are the packed segments, and the returned
        sample mask is that of the rows holding at least one kept sample.
        """
        batch, length, width = hidden.shape
        nll, entropy = backend.token_stats(
            hidden.reshape(-1, width).to(weight.dtype), weight, targets.reshape(-1), bias=bias, chunk_size=self.qtuning_config.chunk_size
        )
        nll, entropy = nll.view(batch, length), entropy.view(batch, length)
        gather = default_sample_gather()
        if segments is None:
            selection = select(nll, entropy, mask, self.qtuning_config, sample_gather=gather)
            token_mask = selection.token_mask
        else:
            selection = select(
                segments.unpack(nll),
                segments.unpack(entropy),
                segments.unpack(mask, False),
                self.qtuning_config,
                sample_gather=gather,
            )
            token_mask = segments.repack(selection.token_mask)
        self.qtuning_last_selection = selection
        self._record(selection.stats, mask, token_mask)
        self.qtuning_history.record_samples(selection, step=self.state.global_step + 1)
        return token_mask.any(dim=1), token_mask

    # --------------------------------------------------------------- logging
    def _record(self, stats: dict[str, float], mask: Tensor, token_mask: Tensor) -> None:
        self.qtuning_history.record(stats, float(mask.sum()), float(token_mask.sum()))

    def qtuning_metrics(self) -> dict[str, float]:
        """The mean of each statistic over the micro-batches since the last call, plus running totals."""
        return self.qtuning_history.flush(self.state.global_step)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self.qtuning_config.enabled and "loss" in logs:
            logs = {**logs, **self.qtuning_metrics()}
        super().log(logs, *args, **kwargs)

    # ------------------------------------------------------ checkpoint/resume
    def train(self, resume_from_checkpoint: Union[str, bool, None] = None, *args: Any, **kwargs: Any):
        """`Trainer.train`, with the Q-Tuning history reset, or read back from the checkpoint resumed."""
        self.qtuning_history.reset()
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            from transformers.trainer_utils import get_last_checkpoint

            checkpoint = get_last_checkpoint(self.args.output_dir)
        if isinstance(checkpoint, (str, os.PathLike)) and self.qtuning_config.enabled:
            if not self.qtuning_history.load(str(checkpoint)):
                LOG.warning("qtuning: %s has no qtuning_state.json; metrics and plots start afresh", checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """`Trainer._save_checkpoint`, plus ``qtuning_state.json`` (`QTuningHistory`) in the checkpoint."""
        if self.qtuning_config.enabled and self.args.should_save:
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            os.makedirs(folder, exist_ok=True)
            self.qtuning_history.save(folder)
        super()._save_checkpoint(model, trial)

"""The Q-Tuning training step as a `transformers.Trainer` mixin.

    class MyTrainer(QTuningTrainerMixin, Trainer): ...
    trainer = MyTrainer(model=model, args=args, ..., qtuning_config=QTuningConfig())

Axolotl's trainer runs this same code (`qtuning_plugin.axolotl.plugin`).

``triage_scope: step`` (default): the mini-batch that is triaged is the optimizer step's
(SPEC section 4). The Trainer fetches all of a step's micro-batches before the first forward
(`Trainer.get_batch_samples`); there, each micro-batch is scored by a gradient-free forward
(only per-token NLL and entropy are kept), the step's samples are triaged at once (over every
rank's), Q2 tokens pruned, and the rows holding a kept token are regrouped into as few
training passes of at most ``micro_batch_size`` rows as they fill (`qtuning_plugin.step`).
The step's micro-batch slots are handed back to the Trainer's loop as "no pass" slots followed
by the passes, so that the last slot, where the loop synchronises gradients (DDP) or steps the
engine (DeepSpeed), is a real pass. The loss of the step is the mean cross-entropy over all of
its kept tokens, on all ranks: the update of one large batch.

``triage_scope: micro_batch``: each training micro-batch is triaged on its own, inside
``compute_loss``:

* two_pass (default without packing): a gradient-free forward over the whole
  micro-batch scores every token; triage and Q2 token pruning pick the kept
  samples and tokens; forward + backward then runs on the kept rows only.
* single_pass (sample packing): one forward with gradient; the statistics come
  from its detached hidden states, each packed segment is triaged as a sample,
  and pruning is loss masking.

  The loss of a micro-batch is then the mean cross-entropy over its kept tokens; over gradient
  accumulation and data-parallel ranks the update is the mean of the micro-batch losses.
  `compute_loss` called on a raw micro-batch (outside the Trainer's loop) takes this path too,
  whatever the scope.
"""

from __future__ import annotations

import os
from typing import Any, Literal, Optional, Union

import torch
from torch import Tensor, nn

from qtuning_plugin._logging import LOG
from qtuning_plugin.config import QTuningConfig
from qtuning_plugin.core import Segments, is_packed, select
from qtuning_plugin.distributed import default_sample_gather
from qtuning_plugin.history import QTuningHistory
from qtuning_plugin.modeling import head_forward, shifted_targets
from qtuning_plugin.ops.backends import Backend, resolve_backend
from qtuning_plugin.step import NO_PASS, PASS_KEY, TrainingPass, concat, no_pass, plan_step, row_table, segment_table
from qtuning_plugin.trainer_checks import check_trainer_settings

# Below this many samples per triage, sample_keep_ratio is too coarse to be honoured.
MIN_TRIAGE_BATCH = 8


def kept_token_loss(
    backend: Backend,
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    targets: Tensor,
    token_mask: Tensor,
    label_smoothing: float = 0.0,
    reduction: Literal["mean", "sum"] = "mean",
) -> Tensor:
    """Cross-entropy (nats) over the kept tokens: their mean, or with ``reduction="sum"`` their sum.

    Args:
        hidden: ``[B, T, H]`` final hidden states (with gradient).
        weight, bias: the LM head, ``[V, H]`` and ``[V]`` or None.
        targets: ``[B, T]`` int64, already shifted.
        token_mask: ``[B, T]`` bool, the kept tokens.
        label_smoothing: in [0, 1], as transformers' ``label_smoothing_factor``.

    Returns:
        A scalar; 0 with zero gradients when no token is kept.
    """
    # k-bit training keeps the head in float32 while the body may run in bf16.
    rows = hidden[token_mask].to(weight.dtype)
    loss = backend.linear_cross_entropy(
        rows, weight, targets[token_mask], bias=bias, reduction="sum", label_smoothing=label_smoothing
    )
    return loss if reduction == "sum" else loss / max(rows.shape[0], 1)


def _pad_cat(parts: list[Tensor], fill: Union[float, bool]) -> Tensor:
    """``[n_i, t_i]`` tensors stacked into ``[sum n_i, max t_i]``, ``fill`` past each one's width."""
    out = parts[0].new_full((sum(p.shape[0] for p in parts), max(p.shape[1] for p in parts)), fill)
    start = 0
    for part in parts:
        out[start : start + part.shape[0], : part.shape[1]] = part
        start += part.shape[0]
    return out


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
            check_trainer_settings(self, self.qtuning_config)
            if not from_args:  # Axolotl's plugin has logged it already, before the model loaded
                LOG.info("Q-Tuning is active: %s", self.qtuning_config.describe())
            self._warn_if_triage_batch_is_small()
            from qtuning_plugin.callbacks import QTuningPlotCallback, QTuningStateCallback

            self.add_callback(QTuningPlotCallback(self.qtuning_history, self.qtuning_config.plot_every_n_steps))
            self.add_callback(QTuningStateCallback(self.qtuning_history))

    def _warn_if_triage_batch_is_small(self) -> None:
        args = self.args
        samples = self.qtuning_config.triage_batch_size(
            args.per_device_train_batch_size, args.gradient_accumulation_steps, args.world_size
        )
        if samples >= MIN_TRIAGE_BATCH:
            return
        if self.qtuning_config.triage_scope == "step":
            formula = (
                f"micro_batch_size {args.per_device_train_batch_size} x gradient_accumulation_steps "
                f"{args.gradient_accumulation_steps} x world_size {args.world_size}"
            )
        else:
            formula = (
                f"micro_batch_size {args.per_device_train_batch_size} x world_size {args.world_size}; "
                "`triage_scope: step` triages the whole optimizer step"
            )
        LOG.warning(
            "qtuning: each triage sees %d samples (%s); with fewer than %d, sample_keep_ratio=%g "
            "cannot be honoured (a triage keeps at least one sample)",
            samples, formula, MIN_TRIAGE_BATCH, self.qtuning_config.sample_keep_ratio,
        )

    # ------------------------------------------------------- step-scope triage
    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> tuple[list, Any]:
        """`Trainer.get_batch_samples`, then (``triage_scope: step``) the step's triaged passes.

        Returns as many micro-batch slots as the step has micro-batches: "no pass" slots first,
        then the training passes, and no ``num_items_in_batch`` (our loss is normalised already).
        """
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        config = self.qtuning_config
        if not (config.enabled and config.triage_scope == "step" and batch_samples):
            return batch_samples, num_items_in_batch
        model = self.model_wrapped
        model.train()  # as training_step does; the scoring forward runs in the mode the loss is trained in
        passes = self._triage_step(
            [self.qtuning_prepare_inputs(model, self._prepare_inputs(batch)) for batch in batch_samples]
        )
        if len(passes) > len(batch_samples):
            raise RuntimeError(f"qtuning: {len(passes)} training passes for {len(batch_samples)} micro-batches")
        slots = [no_pass(self.args.device) for _ in range(len(batch_samples) - len(passes))]
        return slots + passes, None

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Tensor:
        if inputs.get(PASS_KEY) is NO_PASS:
            return torch.zeros((), device=self.args.device)
        return super().training_step(model, inputs, num_items_in_batch)

    def _triage_step(self, micro_batches: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Score and triage one optimizer step's micro-batches; this rank's training passes."""
        config = self.qtuning_config
        segments = [
            Segments.from_position_ids(inputs["position_ids"]) if self._is_packed(inputs) else None
            for inputs in micro_batches
        ]
        targets = [
            shifted_targets(inputs["labels"], inputs["position_ids"] if s is not None else None)
            for inputs, s in zip(micro_batches, segments)
        ]
        masks = [t != -100 for t in targets]
        backend = self._backend(targets[0].device, any(s is not None for s in segments))
        if self.state.global_step < config.warmup_steps:
            token_masks = masks
            stats = {"qtuning/warmup": 1.0}
        else:
            token_masks, stats = self._select_step(backend, micro_batches, targets, masks, segments)
        tables = []
        for inputs, t, kept, s in zip(micro_batches, targets, token_masks, segments):
            if s is None:
                tables.append(row_table(inputs, t, kept, kept.any(dim=1).nonzero().squeeze(1)))
            else:
                kept_segments = s.unpack(kept, False).any(dim=1).nonzero().squeeze(1)
                tables.append(segment_table(inputs, t, kept, s, kept_segments))
        first_row = torch.zeros(1, dtype=torch.long, device=targets[0].device)
        fallback = row_table(micro_batches[0], targets[0], torch.zeros_like(masks[0]), first_row)
        rows_per_pass = max(t.shape[0] for t in targets)
        row_capacity = max(t.shape[1] for t in targets)
        passes = plan_step(concat(tables), rows_per_pass, row_capacity, len(micro_batches), fallback)
        stats["qtuning/training_passes"] = float(len(passes))
        self._record(stats, torch.cat([m.flatten() for m in masks]), torch.cat([m.flatten() for m in token_masks]))
        return passes

    def _select_step(
        self,
        backend: Backend,
        micro_batches: list[dict[str, Any]],
        targets: list[Tensor],
        masks: list[Tensor],
        segments: list[Optional[Segments]],
    ) -> tuple[list[Tensor], dict[str, float]]:
        """Gradient-free scoring of every micro-batch, then one `select` over the step's samples.

        Returns each micro-batch's ``[B, T]`` kept-token mask and the selection's statistics.
        Packed rows take part as their segments.
        """
        model = self.model_wrapped
        nll, entropy, mask = [], [], []
        with torch.no_grad():
            for inputs, t, m, s in zip(micro_batches, targets, masks, segments):
                nll_i, entropy_i = head_forward(model, inputs, lambda h, w, b: self._token_stats(backend, h, w, b, t))
                nll.append(nll_i if s is None else s.unpack(nll_i))
                entropy.append(entropy_i if s is None else s.unpack(entropy_i))
                mask.append(m if s is None else s.unpack(m, False))
        selection = select(
            _pad_cat(nll, 0.0), _pad_cat(entropy, 0.0), _pad_cat(mask, False), self.qtuning_config,
            sample_gather=default_sample_gather(),
        )
        self.qtuning_last_selection = selection
        self.qtuning_history.record_samples(selection, step=self.state.global_step + 1)
        token_masks, start = [], 0
        for m, s in zip(mask, segments):
            kept = selection.token_mask[start : start + m.shape[0], : m.shape[1]]
            token_masks.append(kept if s is None else s.repack(kept))
            start += m.shape[0]
        return token_masks, selection.stats

    def _pass_loss(self, model: nn.Module, inputs: dict[str, Any], training_pass: TrainingPass) -> Tensor:
        backend = self._backend(training_pass.targets.device, False)
        smoothing = self._label_smoothing()
        model_inputs = {key: value for key, value in inputs.items() if key != PASS_KEY}
        return head_forward(
            model,
            model_inputs,
            lambda h, w, b: training_pass.loss_scale
            * kept_token_loss(
                backend, h, w, b, training_pass.targets, training_pass.token_mask, smoothing, reduction="sum"
            ),
        )

    def _label_smoothing(self) -> float:
        """transformers' ``label_smoothing_factor``, honoured by the fused loss."""
        return self.label_smoother.epsilon if self.label_smoother is not None else 0.0

    # ------------------------------------------------------------------ loss
    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch=None):
        training_pass = inputs.get(PASS_KEY)
        if isinstance(training_pass, TrainingPass):
            loss = self._pass_loss(model, inputs, training_pass)
            # Trainer.training_step divides by the step's micro-batch count unless a
            # compute_loss_func normalises; the pass's loss carries its share already.
            if self.compute_loss_func is None:
                loss = loss * self.current_gradient_accumulation_steps
            return (loss, None) if return_outputs else loss
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
        backend = self._backend(labels.device, packed)
        smoothing = self._label_smoothing()
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

    def _backend(self, device: torch.device, packed: bool) -> Backend:
        """The fused cross-entropy backend, resolved (and logged) on first use."""
        if self._qtuning_backend is None:
            self._qtuning_backend = resolve_backend(self.qtuning_config.backend, device)
            scope = self.qtuning_config.triage_scope
            LOG.info(
                "Q-Tuning fused cross-entropy backend: %s; triage_scope %s; scoring %s",
                self._qtuning_backend.name,
                scope,
                "two_pass" if scope == "step" else self._scoring(packed),
            )
        return self._qtuning_backend

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
        nll, entropy = self._token_stats(backend, hidden, weight, bias, targets)
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

    def _token_stats(
        self, backend: Backend, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Per-token ``(nll, entropy)``, each ``[B, T]`` float32 nats, of ``hidden [B, T, H]`` (no gradient)."""
        batch, length, width = hidden.shape
        nll, entropy = backend.token_stats(
            hidden.reshape(-1, width).to(weight.dtype), weight, targets.reshape(-1), bias=bias,
            chunk_size=self.qtuning_config.chunk_size,
        )
        return nll.view(batch, length), entropy.view(batch, length)

    # --------------------------------------------------------------- logging
    def _record(self, stats: dict[str, float], mask: Tensor, token_mask: Tensor) -> None:
        self.qtuning_history.record(stats, float(mask.sum()), float(token_mask.sum()))

    def qtuning_metrics(self) -> dict[str, float]:
        """The mean of each statistic over the triages since the last call, plus running totals."""
        return self.qtuning_history.flush()

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

"""`QTuningEngine`: one Q-Tuning step with no trainer behind it.

The engine takes the config and plain values (the step number, the label smoothing) and does
the step's pieces on micro-batches (`MicroBatch`):

1. **score** the micro-batches without gradient: the model body, then the fused per-token NLL and
   entropy on the final hidden states (docs/algorithm.md section 1); a step's micro-batches share
   forwards as memory allows (`qtuning_plugin.engine.scoring`);
2. **select** over a list of micro-batches (a whole optimizer step under ``triage_scope: step``,
   one micro-batch under ``micro_batch``): one core `select` over their samples, packed
   segments unpacked, every rank's samples gathered (sections 2-5);
3. **plan** the training passes of what was kept (`qtuning_plugin.engine.passes`);
4. the **loss** of a pass: the fused cross-entropy summed over its kept tokens, scaled (section 6).

`step_passes` (``triage_scope: step``) and `micro_batch_loss` (``micro_batch``) string these
together. After every selection the engine calls its listeners with a `SelectionEvent`: the
host's logging listens there, and so may anyone who wants to see what was kept
(``qtuning_on_selection`` of the trainer mixin). A host adapter only feeds micro-batches in
and hands passes and losses to its training loop.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Literal, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from qtuning_plugin._logging import LOG
from qtuning_plugin.config import QTuningConfig
from qtuning_plugin.core import Selection, select
from qtuning_plugin.core.triage import NO_TARGET
from qtuning_plugin.core.window import TriageWindow
from qtuning_plugin.distributed import default_sample_gather
from qtuning_plugin.engine.micro_batch import MicroBatch
from qtuning_plugin.engine.passes import PASS_KEY, TrainingPass, training_passes
from qtuning_plugin.engine.scoring import score_in_groups
from qtuning_plugin.modeling import head_forward
from qtuning_plugin.ops import default_chunk_size
from qtuning_plugin.ops.backends import Backend, resolve_backend

# Below this many samples per triage, sample_keep_ratio is too coarse to be honoured.
MIN_TRIAGE_SAMPLES = 8


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


@dataclass(frozen=True)
class SelectionEvent:
    """One triage, as the engine's listeners see it.

    Attributes:
        step: the optimizer step (1-based) being trained.
        micro_batches: the micro-batches triaged together, on this rank.
        token_masks: each micro-batch's ``[B, T]`` bool kept tokens.
        selection: the core `Selection` over this rank's samples of the triage, micro-batch after
            micro-batch (packed segments as samples); None in warm-up, where every trainable
            token is kept.
        stats: the ``qtuning/`` metrics of this triage (Python floats).
    """

    step: int
    micro_batches: tuple[MicroBatch, ...]
    token_masks: tuple[Tensor, ...]
    selection: Optional[Selection]
    stats: dict[str, float]

    @property
    def sample_input_ids(self) -> list[Tensor]:
        """Each sample's ``input_ids`` (1-D, padding left out), in the order of ``selection``'s rows."""
        return [ids for batch in self.micro_batches for ids in batch.sample_input_ids()]

    @property
    def trainable_tokens(self) -> int:
        return sum(int(batch.mask.sum()) for batch in self.micro_batches)

    @property
    def kept_tokens(self) -> int:
        return sum(int(mask.sum()) for mask in self.token_masks)


Listener = Callable[[SelectionEvent], None]


def _pad_cat(parts: list[Tensor], fill: Union[float, bool]) -> Tensor:
    """``[n_i, t_i]`` tensors stacked into ``[sum n_i, max t_i]``, ``fill`` past each one's width."""
    out = parts[0].new_full((sum(p.shape[0] for p in parts), max(p.shape[1] for p in parts)), fill)
    start = 0
    for part in parts:
        out[start : start + part.shape[0], : part.shape[1]] = part
        start += part.shape[0]
    return out


class QTuningEngine:
    """Q-Tuning's training step, for any host.

    Args:
        config: the Q-Tuning settings.
        data_parallel: gather the per-sample statistics (and, under ``triage_scope: step``, the
            kept units) over torch.distributed's default process group when one runs.
        listeners: called with every `SelectionEvent`; more can be appended to ``listeners``.
        backend: the fused ops to use; by default resolved from ``config.backend`` on first use.

    ``window`` holds the earlier steps' samples that a triage's thresholds pool with its own
    (``triage_window``; empty at 1); a host that checkpoints saves and restores it.
    """

    def __init__(
        self,
        config: QTuningConfig,
        *,
        data_parallel: bool = True,
        listeners: Sequence[Listener] = (),
        backend: Optional[Backend] = None,
    ):
        self.config = config
        self.data_parallel = data_parallel
        self.listeners = list(listeners)
        self.backend = backend
        self.window = TriageWindow(config.triage_window)
        self._warned_small_triage = False
        self._checked_labels = False

    # ---------------------------------------------------------------- scoring
    def resolve_backend(self, device: torch.device) -> Backend:
        """The fused cross-entropy backend, resolved (and logged) on first use."""
        if self.backend is None:
            self.backend = resolve_backend(self.config.backend, device)
            LOG.info(
                "Q-Tuning fused cross-entropy backend: %s; triage_scope %s; scoring %s",
                self.backend.name, self.config.triage_scope, self.scoring,
            )
        return self.backend

    @property
    def scoring(self) -> str:
        """``two_pass`` or ``single_pass`` (``auto`` is ``two_pass``)."""
        return "single_pass" if self.config.scoring == "single_pass" else "two_pass"

    def token_stats(
        self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, chunk_targets: Optional[int] = None
    ) -> tuple[Tensor, Tensor]:
        """Per-token ``(nll, entropy)``, each ``[B, T]`` float32 nats, of ``hidden [B, T, H]`` (no gradient).

        ``chunk_targets``: with the torch backend and no ``chunk_size`` set, chunk the logits as for
        this many targets (the torch op's default chunk grows with the targets up to its budget, so
        a forward over several micro-batches chunks as one of them would).
        """
        batch, length, width = hidden.shape
        backend = self.resolve_backend(hidden.device)
        chunk_size = self.config.chunk_size
        if chunk_size is None and chunk_targets is not None and backend.name == "torch":
            chunk_size = default_chunk_size(max(chunk_targets, 1), weight.shape[0])
        nll, entropy = backend.token_stats(
            hidden.reshape(-1, width).to(weight.dtype), weight, targets.reshape(-1), bias=bias, chunk_size=chunk_size
        )
        return nll.view(batch, length), entropy.view(batch, length)

    def score(self, model: nn.Module, batch: MicroBatch, chunk_targets: Optional[int] = None) -> tuple[Tensor, Tensor]:
        """The scoring forward: ``(nll, entropy)``, each ``[B, T]``, without gradient (``chunk_targets``:
        `token_stats`).

        The statistics run in place of the LM head, inside the model's forward
        (`head_forward`), where FSDP/ZeRO-3 hold the head's full weight.
        """
        with torch.no_grad():
            return head_forward(
                model, batch.inputs, lambda h, w, b: self.token_stats(h, w, b, batch.targets, chunk_targets)
            )

    # -------------------------------------------------------------- selection
    def in_warmup(self, step: int) -> bool:
        """Whether optimizer step ``step`` (1-based) trains on every sample and token."""
        return step <= self.config.warmup_steps

    def triage(self, model: nn.Module, batches: Sequence[MicroBatch], step: int) -> SelectionEvent:
        """Score ``batches`` (in as few forwards as ``scoring_batch_tokens`` allows,
        `qtuning_plugin.engine.scoring`) and select over them (every trainable token in warm-up)."""
        if self.in_warmup(step):
            return SelectionEvent(
                step, tuple(batches), tuple(b.mask for b in batches), None, {"qtuning/warmup": 1.0}
            )
        scores = score_in_groups(self.score, model, batches, self.config.scoring_batch_tokens, self.data_parallel)
        return self.select(batches, scores, step)

    def select(
        self, batches: Sequence[MicroBatch], scores: Sequence[tuple[Tensor, Tensor]], step: int
    ) -> SelectionEvent:
        """One core `select` over the samples of ``batches``, given each one's ``(nll, entropy)``, pooled
        with the triage window's earlier steps; the step then joins the window."""
        masks = [b.per_sample(b.mask, False) for b in batches]
        selection = select(
            _pad_cat([b.per_sample(nll) for b, (nll, _) in zip(batches, scores)], 0.0),
            _pad_cat([b.per_sample(entropy) for b, (_, entropy) in zip(batches, scores)], 0.0),
            _pad_cat(masks, False),
            self.config,
            sample_gather=default_sample_gather() if self.data_parallel else None,
            earlier=self.window.earlier(),
        )
        self.window.push(selection.rows)
        self._warn_if_small(selection)
        self._warn_if_labels_cover_prompts(batches)
        token_masks, start = [], 0
        for batch, mask in zip(batches, masks):
            kept = selection.token_mask[start : start + mask.shape[0], : mask.shape[1]]
            token_masks.append(batch.per_row(kept, False))
            start += mask.shape[0]
        return SelectionEvent(step, tuple(batches), tuple(token_masks), selection, selection.stats)

    def _warn_if_small(self, selection: Selection) -> None:
        samples = int((selection.triage.quadrant != NO_TARGET).sum())
        if self._warned_small_triage or samples >= MIN_TRIAGE_SAMPLES:
            return
        self._warned_small_triage = True
        LOG.warning(
            "qtuning: a triage saw %d samples with trainable tokens; with fewer than %d, "
            "sample_keep_ratio=%g cannot be honoured (a triage keeps at least one sample). A triage "
            "sees micro_batch_size x gradient_accumulation_steps x world_size rows under "
            "`triage_scope: step` (micro_batch_size x world_size under micro_batch), each packed "
            "sample counted on its own",
            samples, MIN_TRIAGE_SAMPLES, self.config.sample_keep_ratio,
        )

    def _warn_if_labels_cover_prompts(self, batches: Sequence[MicroBatch]) -> None:
        """Once, at the first triage: a warning if every sample's labels cover all of its tokens
        (every target but the one past its end), as they do where the prompt is not masked."""
        if self._checked_labels:
            return
        self._checked_labels = True
        lengths = torch.cat([b.sample_lengths() for b in batches])
        trainable = torch.cat([b.per_sample(b.mask, False).sum(dim=1) for b in batches])
        real = lengths >= 2
        if not bool(real.any()) or bool((trainable[real] < lengths[real] - 1).any()):
            return
        LOG.warning(
            "qtuning: every token of every sample of the first triage is trained on (the labels cover the "
            "prompts too), so each sample's PPL and Ent describe its prompt as well as its response, and "
            "Q-Tuning's statistics are meant over response tokens (docs/algorithm.md section 2). Mask the "
            "prompts: Axolotl `train_on_inputs: false`; TRL `assistant_only_loss=True` (conversational "
            "data) or prompt-completion data; LLaMA-Factory `train_on_prompt: false`"
        )

    def emit(self, event: SelectionEvent) -> None:
        for listener in self.listeners:
            listener(event)

    # ---------------------------------------------------------- whole steps
    def step_passes(self, model: nn.Module, batches: Sequence[MicroBatch], step: int) -> list[dict[str, Any]]:
        """``triage_scope: step``: triage an optimizer step's micro-batches (a collective in
        data-parallel training) and return this rank's training passes, at most ``len(batches)``:
        model inputs with a `TrainingPass` under `PASS_KEY` (`pass_loss`)."""
        event = self.triage(model, batches, step)
        passes = training_passes(batches, event.token_masks, spread=self.data_parallel)
        self.emit(replace(event, stats={**event.stats, "qtuning/training_passes": float(len(passes))}))
        return passes

    def pass_loss(self, model: nn.Module, inputs: dict[str, Any], label_smoothing: float = 0.0) -> Tensor:
        """The scaled loss of one training pass (`step_passes`): forward with gradient, fused
        cross-entropy summed over its kept tokens, times its ``loss_scale``."""
        training_pass: TrainingPass = inputs[PASS_KEY]
        backend = self.resolve_backend(training_pass.targets.device)
        model_inputs = {key: value for key, value in inputs.items() if key != PASS_KEY}
        return head_forward(
            model,
            model_inputs,
            lambda h, w, b: training_pass.loss_scale
            * kept_token_loss(
                backend, h, w, b, training_pass.targets, training_pass.token_mask, label_smoothing, reduction="sum"
            ),
        )

    def micro_batch_loss(self, model: nn.Module, batch: MicroBatch, step: int, label_smoothing: float = 0.0) -> Tensor:
        """``triage_scope: micro_batch``: the mean cross-entropy over the kept tokens of one
        micro-batch, triaged on its own (over every rank's micro-batch).

        two_pass: a scoring forward, then forward/backward on the rows (segments) with a kept
        token only. single_pass: one forward with gradient, the statistics from its detached
        hidden states, pruning by loss masking.
        """
        if not bool(batch.mask.any()):
            LOG.warning("qtuning: a micro-batch without any trainable token; its loss is 0")
        if self.scoring == "single_pass" and not self.in_warmup(step):
            backend = self.resolve_backend(batch.targets.device)

            def select_and_loss(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
                event = self.select([batch], [self.token_stats(hidden.detach(), weight, bias, batch.targets)], step)
                self.emit(event)
                return kept_token_loss(
                    backend, hidden, weight, bias, batch.targets, event.token_masks[0], label_smoothing
                )

            return head_forward(model, batch.inputs, select_and_loss)
        event = self.triage(model, [batch], step)
        (training_pass,) = training_passes([batch], event.token_masks, spread=False)
        self.emit(event)
        return self.pass_loss(model, training_pass, label_smoothing)

"""Chunked LM-head statistics and cross-entropy in pure PyTorch.

Both ops take the hidden states ``[N, H]`` that feed the LM head ``weight [V, H]`` (+ optional
``bias [V]``) and never materialise the full ``[N, V]`` logits. Rows whose target equals
``ignore_index`` are dropped first; the rest are processed in chunks of ``chunk_size`` rows: one
matmul ``z = hidden_chunk @ weight.T`` in the input dtype, then float32 (float64 for float64
inputs) bias, softmax and reductions, in two ``[chunk_size, V]`` buffers reused by every chunk.

* :func:`token_stats` -- per-token NLL and predictive entropy (nats), no autograd.
* :func:`linear_cross_entropy` -- differentiable cross-entropy with a chunked backward, optionally
  label-smoothed.

Under ``torch.autocast`` both ops run the LM-head matmul in the autocast dtype, as the model's own
``nn.Linear`` head would, and the softmax and reductions in float32 as always.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch import Tensor

from qtuning_plugin.ops.contract import CHUNK_ELEMENTS, default_chunk_size, kept_row_stats, kept_rows, validate_inputs

__all__ = ["linear_cross_entropy", "token_stats"]

#: Half of `contract.CHUNK_ELEMENTS` where the gradients are computed too: the float32 [V, H]
#: gradient accumulator is live beside the two chunk buffers, so smaller chunks keep the peak lower.
_GRAD_CHUNK_ELEMENTS = CHUNK_ELEMENTS // 2
_REDUCTIONS = ("sum", "mean", "none")


def _softmax_chunks(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], chunk_size: int
) -> Iterator[tuple[int, Tensor, Tensor, Tensor]]:
    """Yield ``(start, z, p, lse)`` for each chunk of ``C <= chunk_size`` rows of ``hidden``.

    ``z [C, V]`` are the logits ``hidden[start:start + C] @ weight.T + bias``, ``p [C, V]`` their
    softmax and ``lse [C]`` their logsumexp. The matmul runs in the input dtype, the rest in float32
    (float64 for float64 inputs). ``z`` and ``p`` are views of buffers that the next chunk
    overwrites, so callers may modify them in place.
    """
    acc = torch.promote_types(hidden.dtype, torch.float32)
    rows = max(1, min(chunk_size, hidden.shape[0]))
    z_buf, p_buf = (hidden.new_empty(rows, weight.shape[0], dtype=acc) for _ in range(2))
    mm_buf = z_buf if acc == hidden.dtype else hidden.new_empty(z_buf.shape)
    for start in range(0, hidden.shape[0], rows):
        h = hidden[start : start + rows]
        z, p, mm = z_buf[: len(h)], p_buf[: len(h)], mm_buf[: len(h)]
        torch.matmul(h, weight.T, out=mm)
        if mm is not z:
            z.copy_(mm)
        if bias is not None:
            z += bias
        torch.softmax(z, dim=1, out=p)
        # The row max has probability 1 / sum_v exp(z_v - max), so lse = max - log(max_v p_v).
        yield start, z, p, z.amax(dim=1) - p.amax(dim=1).log()


def _autocast_inputs(*tensors: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
    """The tensors in the autocast dtype of their device when autocast is on there, else unchanged.

    As autocast casts an ``nn.Linear``'s operands (float64 ones are left as they are). With every
    operand in that dtype, autocast changes nothing inside the ops: each chunk's matmul runs in it,
    and the softmax and reductions in float32 as always.
    """
    device_type = next(t for t in tensors if t is not None).device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t if t is None or t.dtype == torch.float64 else t.to(dtype) for t in tensors)


@torch.no_grad()
def token_stats(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Optional[Tensor] = None,
    ignore_index: int = -100,
    chunk_size: Optional[int] = None,
) -> tuple[Tensor, Tensor]:
    """Per-token negative log-likelihood and predictive entropy of the LM head, in nats.

    Args:
        hidden: ``[N, H]`` hidden states (float32, bfloat16 or float16).
        weight: ``[V, H]`` LM-head weight, same dtype as ``hidden``.
        targets: ``[N]`` int64 next-token ids; ``ignore_index`` marks positions to skip.
        bias: optional ``[V]`` LM-head bias.
        ignore_index: target value of skipped positions.
        chunk_size: tokens per chunk; ``None`` uses `contract.default_chunk_size`.

    Returns:
        ``(nll, entropy)``, each ``[N]`` float32 (float64 for float64 inputs), with ``z`` the logits:
        ``nll = logsumexp(z) - z[target]`` and ``entropy = logsumexp(z) - sum_v softmax(z)_v z_v``
        (entropy of the full-vocabulary predictive distribution). Both are 0 at ignored positions.
        No autograd graph is recorded.
    """
    hidden, weight, bias = _autocast_inputs(hidden, weight, bias)
    acc = torch.promote_types(hidden.dtype, torch.float32)

    def stats_of_rows(h: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        nll, entropy = (h.new_empty(h.shape[0], dtype=acc) for _ in range(2))
        chunk = chunk_size or default_chunk_size(h.shape[0], weight.shape[0])
        for start, z, p, lse in _softmax_chunks(h, weight, bias, chunk):
            end = start + len(z)
            nll[start:end] = lse - z.gather(1, t[start:end, None]).squeeze(1)
            entropy[start:end] = lse - z.mul_(p).sum(dim=1)
        return nll, entropy

    return kept_row_stats(
        stats_of_rows, hidden, weight, targets, bias=bias, ignore_index=ignore_index, chunk_size=chunk_size, dtype=acc
    )


def _loss_and_grads(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    targets: Tensor,
    ignore_index: int,
    label_smoothing: float,
    chunk_size: int,
    needs_grad: tuple[bool, bool, bool],
    row_scale: Optional[Tensor] = None,
) -> tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Chunked per-token cross-entropy and its gradients.

    With ``eps = label_smoothing`` the loss of a row with logits ``z`` and target ``t`` is
    ``(1 - eps) * (lse - z_t) + eps * (lse - mean_v z_v)``, the cross-entropy against the target
    smoothed with ``eps`` spread uniformly over the vocabulary (``F.cross_entropy``'s
    ``label_smoothing``, transformers' ``LabelSmoother``); its gradient w.r.t. ``z`` is
    ``softmax(z) - (1 - eps) * onehot(t) - eps / V``.

    Returns ``(loss [N], grad_hidden [N, H], grad_weight [V, H], grad_bias [V])`` where the gradients
    are those of ``sum_i row_scale[i] * loss[i]`` (``row_scale`` defaults to ones) w.r.t. the inputs
    flagged in ``needs_grad`` (``None`` otherwise). ``loss`` is float32 (0 at ignored rows);
    grad_hidden has ``hidden.dtype``, grad_weight and grad_bias are float32 accumulators
    (float64 throughout for float64 inputs).
    """
    rows = kept_rows(targets, ignore_index)
    h, t = hidden.index_select(0, rows), targets.index_select(0, rows)
    acc = torch.promote_types(hidden.dtype, torch.float32)
    scale = None if row_scale is None else row_scale.index_select(0, rows).to(acc)
    loss = hidden.new_zeros(hidden.shape[0], dtype=acc)
    grad_hidden = torch.zeros_like(hidden) if needs_grad[0] else None
    grad_weight = weight.new_zeros(weight.shape, dtype=acc) if needs_grad[1] else None
    grad_bias = weight.new_zeros(weight.shape[0], dtype=acc) if needs_grad[2] else None
    for start, z, dz, lse in _softmax_chunks(h, weight, bias, chunk_size):
        end = start + len(z)
        t_c = t[start:end, None]
        row_loss = lse - z.gather(1, t_c).squeeze(1)
        if label_smoothing:
            row_loss = (1.0 - label_smoothing) * row_loss + label_smoothing * (lse - z.mean(dim=1))
        loss.index_copy_(0, rows[start:end], row_loss)
        if not any(needs_grad):
            continue
        # dloss/dlogits = softmax - (1 - eps) onehot(target) - eps / V, optionally scaled per row.
        dz.scatter_add_(1, t_c, dz.new_full(t_c.shape, label_smoothing - 1.0))
        if label_smoothing:
            dz.sub_(label_smoothing / dz.shape[1])
        if scale is not None:
            dz.mul_(scale[start:end, None])
        dz_mm = dz.to(hidden.dtype)
        if grad_hidden is not None:
            grad_hidden.index_copy_(0, rows[start:end], dz_mm @ weight)
        if grad_weight is not None:  # accumulated in float32; the product runs in the input dtype
            if grad_weight.dtype == hidden.dtype:
                grad_weight.addmm_(dz_mm.T, h[start:end])
            else:
                grad_weight += dz_mm.T @ h[start:end]
        if grad_bias is not None:
            grad_bias += dz.sum(dim=0)
    return loss, grad_hidden, grad_weight, grad_bias


class _LinearCrossEntropy(torch.autograd.Function):
    """Cross-entropy of ``hidden @ weight.T + bias``; see :func:`linear_cross_entropy`.

    For ``"sum"``/``"mean"`` the gradients of the summed loss are computed chunk by chunk during the
    forward and only scaled by ``grad_output`` in the backward. For ``"none"`` the per-row
    ``grad_output`` is only known in the backward, which therefore recomputes the chunks.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index, label_smoothing, reduction, chunk_size, grad_enabled):
        args = (hidden, weight, bias, targets, ignore_index, label_smoothing, chunk_size)
        ctx.options, ctx.reduction = (ignore_index, label_smoothing, chunk_size), reduction
        ctx.needs_grad = tuple(grad_enabled and flag for flag in ctx.needs_input_grad[:3])
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        if reduction == "none":
            ctx.save_for_backward(hidden, weight, bias, targets)
            return _loss_and_grads(*args, needs_grad=(False, False, False))[0]
        loss, *grads = _loss_and_grads(*args, needs_grad=ctx.needs_grad)
        ctx.save_for_backward(*grads)
        ctx.divisor = max(1, int((targets != ignore_index).sum())) if reduction == "mean" else 1
        return loss.sum() / ctx.divisor

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        if ctx.reduction == "none":
            _, *grads = _loss_and_grads(*ctx.saved_tensors, *ctx.options, ctx.needs_grad, grad_output)
        else:
            grads = [None if g is None else g * (grad_output / ctx.divisor) for g in ctx.saved_tensors]
        grads = [None if g is None else g.to(dtype) for g, dtype in zip(grads, ctx.dtypes)]
        return (*grads, None, None, None, None, None, None)


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "sum",
    chunk_size: Optional[int] = None,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Cross-entropy of the LM-head logits ``hidden @ weight.T + bias`` against ``targets``, in nats.

    Equivalent to ``F.cross_entropy(hidden @ weight.T + bias, targets, ignore_index=ignore_index,
    reduction=reduction, label_smoothing=label_smoothing)`` with float32 softmax, but neither the
    forward nor the backward holds the ``[N, V]`` logits: memory is ``O(chunk_size * V)`` plus the
    gradients themselves. Differentiable w.r.t. ``hidden``, ``weight`` and ``bias`` (only those that
    require grad are computed).

    Args:
        hidden: ``[N, H]`` hidden states (float32, bfloat16 or float16).
        weight: ``[V, H]`` LM-head weight, same dtype as ``hidden``.
        targets: ``[N]`` int64 target ids; ``ignore_index`` marks positions without a loss.
        bias: optional ``[V]`` LM-head bias.
        ignore_index: target value of ignored positions.
        reduction: ``"sum"`` (scalar), ``"mean"`` (scalar, mean over non-ignored targets, 0 when there
            are none) or ``"none"`` (``[N]``, 0 at ignored positions).
        chunk_size: tokens per chunk; ``None`` uses `contract.default_chunk_size` at half its budget.
        label_smoothing: in [0, 1]; the target's probability mass moved uniformly over the
            vocabulary (see `_loss_and_grads`).

    Returns:
        float32 loss (float64 for float64 inputs): a scalar for ``"sum"``/``"mean"``, ``[N]`` for
        ``"none"``. Gradients are returned in the dtypes of their inputs.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    hidden, weight, bias = _autocast_inputs(hidden, weight, bias)
    validate_inputs(hidden, weight, targets, bias, chunk_size)
    if chunk_size is None:
        chunk_size = default_chunk_size(hidden.shape[0], weight.shape[0], elements=_GRAD_CHUNK_ELEMENTS)
    return _LinearCrossEntropy.apply(
        hidden, weight, bias, targets, ignore_index, float(label_smoothing), reduction, chunk_size,
        torch.is_grad_enabled(),
    )

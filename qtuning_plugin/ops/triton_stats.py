"""Per-token NLL and predictive entropy of the LM head with a Triton online-softmax kernel.

The statistics pass of Q-Tuning needs, for every trainable token, ``nll = lse(z) - z[target]``
and ``entropy = lse(z) - sum_v softmax(z)_v z_v`` over the full vocabulary (docs/algorithm.md section 1),
without gradient. This module computes them like Liger Kernel's fused linear cross-entropy
(``liger_kernel/ops/cross_entropy.py``): the tokens are split into chunks, each chunk's logits
``[n, V]`` come from one matmul in the input dtype, and a Triton kernel with one program per row
reduces them in a single pass over V (online softmax, Milakov & Gimelshein 2018, extended with a
running sum of ``p * z`` for the entropy). Only one chunk of logits exists at a time.

Importing this module needs ``triton``; `qtuning_plugin.ops.backends` imports it lazily. On CPU
the kernel runs only under the Triton interpreter (``TRITON_INTERPRET=1`` set before this module
is imported), which the tests use.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from qtuning_plugin.ops.contract import default_chunk_size, kept_row_stats

__all__ = ["default_block_size", "logits_stats", "token_stats"]

#: Largest vocabulary block one program reduces per loop iteration (Liger's MAX_FUSED_SIZE).
MAX_BLOCK_SIZE = 32768


@triton.jit
def _token_stats_kernel(
    logits_ptr,
    logits_stride,
    bias_ptr,
    targets_ptr,
    nll_ptr,
    entropy_ptr,
    n_cols,
    ignore_index,
    HAS_BIAS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """One program per row of ``logits [n, V]``: write ``nll[row]`` and ``entropy[row]`` (float32).

    ``z = logits[row] + bias`` in float32 (``bias [V]`` only if ``HAS_BIAS``).

    Single pass over V in blocks of ``BLOCK_SIZE`` with, relative to the running max ``m``:
    ``d = sum exp(z - m)`` and ``s = sum exp(z - m) * (z - m)``, both rescaled by
    ``alpha = exp(m - m_new)`` when the max grows (``s`` also gains ``(m - m_new) * d``).
    Then ``lse = m + log d``, ``nll = lse - z[y]`` and ``entropy = log d - s / d`` (``m`` cancels,
    which keeps the entropy exact for large logits). Rows whose target is ``ignore_index`` get 0.
    """
    row = tl.program_id(0).to(tl.int64)
    y = tl.load(targets_ptr + row)
    if y == ignore_index:
        tl.store(nll_ptr + row, 0.0)
        tl.store(entropy_ptr + row, 0.0)
        return
    logits_ptr += row * logits_stride
    z_y = tl.load(logits_ptr + y).to(tl.float32)
    if HAS_BIAS:
        z_y += tl.load(bias_ptr + y).to(tl.float32)
    # Start the running max at z[y], a value of the row: m is finite from the first block on,
    # so the rescaling never meets inf - inf, and the final m is still the row max.
    m = z_y
    d = 0.0
    s = 0.0
    for start in range(0, n_cols, BLOCK_SIZE):
        offsets = start + tl.arange(0, BLOCK_SIZE)
        in_row = offsets < n_cols
        z = tl.load(logits_ptr + offsets, mask=in_row, other=float("-inf")).to(tl.float32)
        if HAS_BIAS:
            z += tl.load(bias_ptr + offsets, mask=in_row, other=0.0).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        alpha = tl.exp(m - m_new)
        shifted = tl.where(in_row, z - m_new, 0.0)
        e = tl.where(in_row, tl.exp(shifted), 0.0)
        s = alpha * (s + (m - m_new) * d) + tl.sum(e * shifted, axis=0)
        d = alpha * d + tl.sum(e, axis=0)
        m = m_new
    log_d = tl.log(d)
    tl.store(nll_ptr + row, m + log_d - z_y)
    tl.store(entropy_ptr + row, log_d - s / d)


def default_block_size(vocab_size: int) -> int:
    """Vocabulary block per loop iteration: ``min(32768, next_power_of_2(V))``."""
    return min(MAX_BLOCK_SIZE, triton.next_power_of_2(vocab_size))


def _num_warps(block_size: int) -> int:
    if torch.version.hip is not None:
        return 16
    return 32 if block_size >= 8192 else max(4, min(32, block_size // 256))


def logits_stats(
    logits: Tensor,
    targets: Tensor,
    *,
    bias: Optional[Tensor] = None,
    ignore_index: int = -100,
    block_size: Optional[int] = None,
) -> tuple[Tensor, Tensor]:
    """``(nll, entropy)`` of ``z = logits + bias``, materialised logits reduced by the kernel.

    ``logits [n, V]`` (any float dtype), ``bias [V]`` or None, ``targets [n]`` int64. Returns two
    ``[n]`` float32 tensors in nats, 0 where ``targets == ignore_index``. The bias is added and
    everything accumulated in float32 whatever the dtype of ``logits``. ``block_size`` (a power
    of two) overrides :func:`default_block_size`; the tests use it to exercise the loop over V.
    """
    n, vocab = logits.shape
    nll = torch.empty(n, dtype=torch.float32, device=logits.device)
    entropy = torch.empty_like(nll)
    if n == 0:
        return nll, entropy
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    block = block_size or default_block_size(vocab)
    _token_stats_kernel[(n,)](
        logits,
        logits.stride(0),
        logits if bias is None else bias.contiguous(),  # a placeholder pointer without bias
        targets.contiguous(),
        nll,
        entropy,
        vocab,
        ignore_index,
        HAS_BIAS=bias is not None,
        BLOCK_SIZE=block,
        num_warps=_num_warps(block),
    )
    return nll, entropy


@torch.no_grad()
def token_stats(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Optional[Tensor] = None,
    ignore_index: int = -100,
    chunk_size: Optional[int] = None,
    block_size: Optional[int] = None,
) -> tuple[Tensor, Tensor]:
    """Per-token NLL and predictive entropy (nats) of ``hidden @ weight.T + bias``; no autograd.

    Same contract as `qtuning_plugin.ops.torch_chunked.token_stats`.

    Args:
        hidden: ``[N, H]`` final hidden states (float32, bfloat16 or float16).
        weight: ``[V, H]`` LM-head weight, same dtype as ``hidden``.
        targets: ``[N]`` int64 next-token ids; ``ignore_index`` marks positions to skip.
        bias: optional ``[V]`` LM-head bias.
        ignore_index: target value of skipped positions.
        chunk_size: tokens per logits chunk; None uses `contract.default_chunk_size`'s
            Triton rule (a chunk's logits about the size of ``hidden``).
        block_size: vocabulary block of the kernel; None uses :func:`default_block_size`.

    Returns:
        ``(nll, entropy)``, each ``[N]`` float32, 0 at ignored positions. Only the rows with a
        target enter the matmul; each chunk's logits ``[chunk, V]`` are computed in the input
        dtype, the bias added in float32 by the kernel, which reduces in float32 (as the torch
        op does).
    """

    def stats_of_rows(h: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        nll = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        entropy = torch.empty_like(nll)
        chunk = chunk_size or default_chunk_size(h.shape[0], weight.shape[0], hidden_size=h.shape[1])
        for start in range(0, h.shape[0], chunk):
            end = start + chunk
            logits = h[start:end] @ weight.t()
            nll[start:end], entropy[start:end] = logits_stats(
                logits, t[start:end], bias=bias, ignore_index=ignore_index, block_size=block_size
            )
            del logits
        return nll, entropy

    return kept_row_stats(
        stats_of_rows, hidden, weight, targets, bias=bias, ignore_index=ignore_index, chunk_size=chunk_size
    )

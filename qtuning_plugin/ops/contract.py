"""What every backend's LM-head op shares: the input checks, the chunk size, and the frame of
``token_stats`` (keep the rows with a target, compute on them, scatter back).

Pure PyTorch; `torch_chunked`, `triton_stats` and `liger` build on it.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

__all__ = ["CHUNK_ELEMENTS", "default_chunk_size", "kept_row_stats", "kept_rows", "validate_inputs"]

#: Element budget of one chunk's float32 logits in the torch ops: 2**24 values = 64 MiB.
CHUNK_ELEMENTS = 2**24


def default_chunk_size(
    num_tokens: int, vocab_size: int, *, elements: int = CHUNK_ELEMENTS, hidden_size: Optional[int] = None
) -> int:
    """Rows per chunk of LM-head logits ``[rows, vocab_size]``, at least 1.

    * ``hidden_size=None`` (the torch ops): ``min(num_tokens, 2**floor(log2(elements // vocab_size)))``,
      the largest power of two whose float32 ``[rows, vocab_size]`` block holds at most ``elements``
      values (64 MiB by default), capped at the number of tokens (e.g. 512 rows for
      ``vocab_size=32000``). `torch_chunked.linear_cross_entropy` uses half that budget.
    * ``hidden_size`` given (our Triton statistics): Liger's rule, a chunk's logits take about as
      much memory as the hidden states, ``next_power_of_2(ceil(N / ceil(V / H)))`` (e.g. 1024 rows
      for N 8192, V 32000, H 4096).

    Why two rules: the torch op keeps two float32 ``[rows, V]`` buffers (logits and softmax) per
    chunk, so a fixed float32 budget bounds its peak; the Triton path keeps one ``[rows, V]`` block
    of logits in the input dtype, which its kernel reduces in one pass, and sizes it as Liger's
    fused linear cross-entropy (whose kernel it follows) does, for larger matmuls. The GPU
    timings of ``benchmarks/gpu_step.py`` were taken with these sizes.
    """
    if hidden_size is not None:
        blocks = -(-max(1, vocab_size) // max(1, hidden_size))
        rows = -(-max(num_tokens, 1) // blocks)
        return 1 << (rows - 1).bit_length()
    rows = max(1, elements // max(1, vocab_size))
    return max(1, min(num_tokens, 1 << (rows.bit_length() - 1)))


def validate_inputs(
    hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor], chunk_size: Optional[int]
) -> None:
    """Raise ValueError unless ``hidden [N, H]``, ``weight [V, H]`` of the same dtype, ``targets [N]``,
    ``bias [V]`` or None, and ``chunk_size`` None or >= 1."""
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D [N, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"weight must be 2-D [V, H] with H={hidden.shape[1]} (from hidden), got {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if targets.dim() != 1 or targets.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"targets must be 1-D [N] with N={hidden.shape[0]} (from hidden), got {tuple(targets.shape)}"
        )
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"bias must be 1-D [V] with V={weight.shape[0]}, got shape {tuple(bias.shape)}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def kept_rows(targets: Tensor, ignore_index: int) -> Tensor:
    """Indices ``[M]`` (int64) of the rows whose target is not ``ignore_index``."""
    return (targets != ignore_index).nonzero().squeeze(1)


def kept_row_stats(
    stats_of_rows: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]],
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Optional[Tensor],
    ignore_index: int,
    chunk_size: Optional[int],
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """The frame of every ``token_stats``: check the inputs, compute on the rows with a target, scatter back.

    ``stats_of_rows(h, t)`` gets the kept rows only, ``h [M, H]`` and ``t [M]`` with ``M >= 1``
    (it is not called when no row has a target), and returns their ``(nll [M], entropy [M])``.

    Returns:
        ``(nll, entropy)``, each ``[N]`` in ``dtype``, 0 at the rows whose target is ``ignore_index``.
    """
    validate_inputs(hidden, weight, targets, bias, chunk_size)
    rows = kept_rows(targets, ignore_index)
    nll = hidden.new_zeros(hidden.shape[0], dtype=dtype)
    entropy = torch.zeros_like(nll)
    if rows.numel() > 0:
        nll_kept, entropy_kept = stats_of_rows(hidden.index_select(0, rows), targets.index_select(0, rows))
        nll.index_copy_(0, rows, nll_kept.to(dtype))
        entropy.index_copy_(0, rows, entropy_kept.to(dtype))
    return nll, entropy

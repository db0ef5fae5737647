"""Liger Kernel glue: the loss and the statistics of the ``liger`` backend.

Pure functions with the signatures of `qtuning_plugin.ops.torch_chunked`:

* :func:`linear_cross_entropy` -- the training loss through Liger's public functional
  ``liger_fused_linear_cross_entropy`` (Triton), called by keyword, with the LM-head weight and
  bias gradients accumulated in float32 (``accum_dtype``); ``reduction="sum"`` or ``"mean"``
  only. ``"none"`` is refused: before liger-kernel 0.8.2 its backward ignored the per-row
  upstream gradient (the gradients were those of the sum). Our trainer gathers the kept rows
  first, asks for the sum and divides by the kept count itself.
* :func:`token_stats` -- gradient-free per-token NLL and entropy. Liger's
  ``LigerFusedLinearScaledCrossEntropyFunction(..., return_entropy=True)`` (liger-kernel >= 0.8.2)
  where it is really fused (its CuTe DSL kernel: Hopper sm90, bf16, no LM-head bias); elsewhere
  our Triton kernel (`qtuning_plugin.ops.triton_stats`). Liger's own non-Hopper path is a PyTorch
  fallback that materialises several float32 ``[512, V]`` buffers per chunk and returns the
  entropy in the input dtype, so ours is preferred there.

liger-kernel and triton are imported on first use: importing this module needs neither.
"""

from __future__ import annotations

import functools
import importlib
from typing import Callable, Optional

import torch
from torch import Tensor

from qtuning_plugin.ops.contract import kept_row_stats, validate_inputs

__all__ = [
    "describe",
    "fused_linear_cross_entropy",
    "linear_cross_entropy",
    "scaled_ce_function",
    "scaled_ce_usable",
    "token_stats",
]

_FUNCTIONAL = "liger_kernel.transformers.functional"
_SCALED_CE = "liger_kernel.ops.fused_linear_scaled_cross_entropy"
_SCALED_CE_SM90 = "liger_kernel.ops.cutedsl.ops.fused_scaled_cross_entropy_sm90"


@functools.lru_cache(maxsize=None)
def fused_linear_cross_entropy() -> Callable:
    """Liger's public ``liger_fused_linear_cross_entropy`` (imports liger-kernel and triton).

    Its keywords (``input``, ``weight``, ``target``, ``bias``, ``ignore_index``, ``label_smoothing``,
    ``reduction``, ``accum_dtype``) are the same from liger-kernel 0.8.1 to 0.8.5.
    """
    return importlib.import_module(_FUNCTIONAL).liger_fused_linear_cross_entropy


@functools.lru_cache(maxsize=None)
def scaled_ce_function() -> Optional[Callable]:
    """``LigerFusedLinearScaledCrossEntropyFunction`` if this liger-kernel has it (>= 0.8.2), else None."""
    try:
        return importlib.import_module(_SCALED_CE).LigerFusedLinearScaledCrossEntropyFunction
    except (ImportError, AttributeError):
        return None


@functools.lru_cache(maxsize=None)
def _sm90_kernel_importable() -> bool:
    """Whether Liger's CuTe DSL sm90 kernel imports (needs the ``cutedsl`` extra: nvidia-cutlass-dsl)."""
    try:
        importlib.import_module(_SCALED_CE_SM90)
    except Exception:  # ImportError, or a CUDA / CuTe DSL initialisation error
        return False
    return True


def _is_sm90(device: torch.device) -> bool:
    return (
        device.type == "cuda"
        and torch.cuda.is_available()
        and torch.version.hip is None
        and torch.cuda.get_device_capability(device) == (9, 0)
    )


def scaled_ce_usable(
    device: torch.device, dtype: Optional[torch.dtype] = torch.bfloat16, has_bias: bool = False
) -> bool:
    """Whether :func:`token_stats` takes Liger's fused scaled cross-entropy for these inputs.

    True only where Liger dispatches it to its fused CuTe DSL kernel: liger-kernel >= 0.8.2 with
    the ``cutedsl`` extra, a Hopper (sm90) GPU, bfloat16 hidden states and weight (``dtype=None``
    skips that check), and no LM-head bias (the kernel takes none).
    """
    return (
        not has_bias
        and (dtype is None or dtype == torch.bfloat16)
        and _is_sm90(torch.device(device))
        and scaled_ce_function() is not None
        and _sm90_kernel_importable()
    )


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
    """Cross-entropy (nats) of ``hidden @ weight.T + bias`` by Liger's fused linear cross-entropy.

    Args:
        hidden: ``[N, H]`` hidden states (float32 or bfloat16), with gradient.
        weight: ``[V, H]`` LM-head weight, same dtype; its gradient is computed only if it
            requires grad (a frozen head under LoRA costs no ``[V, H]`` matmul).
        targets: ``[N]`` int64; ``ignore_index`` marks rows without a loss.
        bias: optional ``[V]`` LM-head bias.
        reduction: ``"sum"`` or ``"mean"`` (over non-ignored targets); ``"none"`` raises.
        chunk_size: ignored: Liger sizes its own token chunks (logits memory about that of hidden).
        label_smoothing: in [0, 1], Liger's ``label_smoothing`` (the semantics of
            ``F.cross_entropy``'s and of `torch_chunked.linear_cross_entropy`).

    Returns:
        A float32 scalar. Liger computes every gradient during the forward (one chunked pass),
        the backward only scales them by the upstream gradient. The weight and bias gradients
        are accumulated in float32 over Liger's chunks and returned in their parameters' dtype.
    """
    del chunk_size
    if reduction not in ("sum", "mean"):
        raise ValueError(
            f"liger linear_cross_entropy supports reduction 'sum' or 'mean', not {reduction!r}: "
            "Liger's reduction='none' backward is wrong before liger-kernel 0.8.2"
        )
    validate_inputs(hidden, weight, targets, bias, None)
    if hidden.shape[0] == 0:  # Liger divides by zero on empty input; a zero that reaches every input
        terms = [t.sum() for t in (hidden, weight, bias) if t is not None and t.requires_grad]
        return sum(terms, hidden.new_zeros((), dtype=torch.float32)).float() * 0.0
    return fused_linear_cross_entropy()(
        input=hidden,
        weight=weight,
        target=targets.contiguous(),
        bias=bias,
        ignore_index=ignore_index,
        label_smoothing=float(label_smoothing),
        reduction=reduction,
        accum_dtype=torch.float32,
    )


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
    """Per-token NLL and predictive entropy (nats), no autograd; contract of `torch_chunked.token_stats`.

    Args:
        hidden: ``[N, H]``; weight: ``[V, H]`` (same dtype); targets: ``[N]`` int64;
        bias: optional ``[V]``; chunk_size: tokens per logits chunk of our Triton path.

    Returns:
        ``(nll, entropy)``, each ``[N]`` float32, 0 at ignored positions. Through Liger's scaled
        cross-entropy where :func:`scaled_ce_usable` (its entropy comes back in bfloat16 and is
        widened), else through `qtuning_plugin.ops.triton_stats.token_stats`.
    """
    if scaled_ce_usable(hidden.device, hidden.dtype, bias is not None):
        return kept_row_stats(
            lambda h, t: scaled_ce_function().apply(h, weight, t, ignore_index=ignore_index, return_entropy=True),
            hidden,
            weight,
            targets,
            bias=bias,
            ignore_index=ignore_index,
            chunk_size=chunk_size,
        )
    from qtuning_plugin.ops import triton_stats

    return triton_stats.token_stats(
        hidden, weight, targets, bias=bias, ignore_index=ignore_index, chunk_size=chunk_size
    )


def describe(device: torch.device) -> str:
    """One line for the start-up log: which op computes what on ``device``."""
    stats = "our Triton kernel (qtuning_plugin.ops.triton_stats)"
    if scaled_ce_usable(device, dtype=None):
        stats = (
            "LigerFusedLinearScaledCrossEntropyFunction(return_entropy=True) for bf16 without LM-head bias, "
            f"else {stats}"
        )
    elif scaled_ce_function() is not None:
        stats += " (Liger's fused scaled cross-entropy needs sm90 and its cutedsl extra)"
    return (
        "loss via liger_fused_linear_cross_entropy (reduction=sum, accum_dtype=float32), "
        f"statistics via {stats}"
    )

"""Which fused linear cross-entropy computes the statistics and the loss (``qtuning.backend``).

* ``torch``: `qtuning_plugin.ops.torch_chunked`, chunked PyTorch; any device.
* ``liger``: CUDA only. Loss through Liger Kernel's ``LigerFusedLinearCrossEntropyFunction``
  (``reduction="sum"`` over the kept rows), statistics through Liger's fused scaled
  cross-entropy where it is fused for the inputs, else our Triton kernel
  (`qtuning_plugin.ops.liger`, `qtuning_plugin.ops.triton_stats`).
* ``auto``: ``liger`` where it can run (a CUDA device, Triton with a working GPU driver,
  liger-kernel importable), ``torch`` everywhere else.

liger-kernel and triton are imported only when ``liger``/``auto`` is resolved on a CUDA device.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from qtuning_plugin._logging import LOG
from qtuning_plugin.ops.torch_chunked import linear_cross_entropy, token_stats

BACKENDS = ("auto", "liger", "torch")


@dataclass(frozen=True)
class Backend:
    """A pair of fused ops with the signatures of `torch_chunked`.

    ``linear_cross_entropy`` is only ever called with ``reduction="sum"`` (and ``label_smoothing``).
    ``description`` says which implementation computes what, for the start-up log.
    """

    name: str
    token_stats: Callable
    linear_cross_entropy: Callable
    description: str = ""


TORCH = Backend(
    "torch",
    token_stats,
    linear_cross_entropy,
    "torch: statistics and loss via the chunked PyTorch op (qtuning_plugin.ops.torch_chunked)",
)


def _version(distribution: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=None)
def _triton_problem() -> Optional[str]:
    """Why Triton cannot launch GPU kernels here, or None if it can."""
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False"
    try:
        triton = importlib.import_module("triton")
    except Exception as error:  # ImportError, or a broken install
        return f"triton is not importable ({error})"
    try:
        triton.runtime.driver.active.get_current_target()
    except Exception as error:
        return f"triton {getattr(triton, '__version__', '?')} has no working GPU driver ({error})"
    return None


@functools.lru_cache(maxsize=None)
def _liger_problem() -> Optional[str]:
    """Why liger-kernel's fused linear cross-entropy cannot be imported, or None if it can."""
    if _version("liger-kernel") is None:
        return "liger-kernel is not installed (pip install 'qtuning-plugin[liger]')"
    try:
        importlib.import_module("liger_kernel.ops.fused_linear_cross_entropy").LigerFusedLinearCrossEntropyFunction
    except Exception as error:
        return f"liger-kernel {_version('liger-kernel')} failed to import its fused linear cross-entropy ({error})"
    return None


def liger_problem(device: Union[torch.device, str]) -> Optional[str]:
    """Why the ``liger`` backend cannot run on ``device``, or None if it can.

    Checked in order: a CUDA device, Triton with a working GPU driver, liger-kernel importable.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return f"it needs a CUDA device and the model is on {device.type}"
    return _triton_problem() or _liger_problem()


def liger_backend(device: Union[torch.device, str] = "cuda") -> Backend:
    """The ``liger`` backend, without checking that it can run (see :func:`liger_problem`)."""
    from qtuning_plugin.ops import liger

    return Backend("liger", liger.token_stats, liger.linear_cross_entropy, liger.describe(torch.device(device)))


def resolve_backend(name: str, device: Union[torch.device, str]) -> Backend:
    """The backend for the ``qtuning.backend`` setting on ``device``; logs the path taken.

    Raises:
        ValueError: ``name`` is not auto/liger/torch, or ``liger`` cannot run on ``device``
            (the message names ``qtuning.backend`` and the reason).
    """
    if name not in BACKENDS:
        raise ValueError(f"qtuning.backend must be one of {', '.join(BACKENDS)}; got {name!r}")
    if name == "torch":
        LOG.info("qtuning.backend torch: %s", TORCH.description)
        return TORCH
    problem = liger_problem(device)
    if problem is not None:
        if name == "liger":
            raise ValueError(
                f"qtuning.backend: liger cannot run here: {problem}. "
                "Set `qtuning.backend: torch` (or `auto`, which picks torch where liger cannot run)."
            )
        LOG.info("qtuning.backend auto: torch (liger is not usable: %s). %s", problem, TORCH.description)
        return TORCH
    backend = liger_backend(device)
    LOG.info(
        "qtuning.backend %s: torch %s, triton %s; %s",
        name,
        torch.__version__,
        _version("triton") or _version("pytorch-triton-rocm"),
        backend.description,
    )
    return backend

"""Which fused linear cross-entropy computes the statistics and the loss (``qtuning.backend``).

* ``torch``: `qtuning_plugin.ops.torch_chunked`, chunked PyTorch; any device.
* ``liger``: CUDA only. Loss through Liger Kernel's ``liger_fused_linear_cross_entropy``
  (``reduction="sum"`` over the kept rows, float32 gradient accumulation), statistics through
  Liger's fused scaled cross-entropy where it is fused for the inputs, else our Triton kernel
  (`qtuning_plugin.ops.liger`, `qtuning_plugin.ops.triton_stats`).
* ``auto``: ``liger`` where it can run (a CUDA device, Triton with a working GPU driver,
  liger-kernel importable), ``torch`` everywhere else.

liger-kernel and triton are imported only when ``liger``/``auto`` is resolved on a CUDA device.

A backend is any object with the attributes and methods of :class:`Backend` (a ``Protocol``):
`TorchBackend` and `LigerBackend` here.
"""

from __future__ import annotations

import functools
import importlib
from typing import Optional, Protocol, Union

import torch
from torch import Tensor

from qtuning_plugin._logging import LOG
from qtuning_plugin.ops import liger, torch_chunked

BACKENDS = ("auto", "liger", "torch")


class Backend(Protocol):
    """A pair of fused LM-head ops, as the trainer calls them.

    ``name`` is the ``qtuning.backend`` value; ``description`` says which implementation computes
    what, for the start-up log.
    """

    name: str
    description: str

    def token_stats(
        self,
        hidden: Tensor,
        weight: Tensor,
        targets: Tensor,
        *,
        bias: Optional[Tensor] = None,
        ignore_index: int = -100,
        chunk_size: Optional[int] = None,
    ) -> tuple[Tensor, Tensor]:
        """Per-token ``(nll, entropy)`` in nats of ``hidden [N, H] @ weight [V, H].T + bias [V]``
        against ``targets [N]``: each ``[N]`` float32, 0 where the target is ``ignore_index``;
        no autograd. See `torch_chunked.token_stats`."""
        ...

    def linear_cross_entropy(
        self,
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
        """Differentiable cross-entropy (nats) of the same logits, a float32 scalar. The trainer
        calls it with ``reduction="sum"`` only. See `torch_chunked.linear_cross_entropy`."""
        ...


class TorchBackend:
    """``torch``: the chunked PyTorch ops (`qtuning_plugin.ops.torch_chunked`); any device."""

    name = "torch"
    description = "torch: statistics and loss via the chunked PyTorch op (qtuning_plugin.ops.torch_chunked)"
    token_stats = staticmethod(torch_chunked.token_stats)
    linear_cross_entropy = staticmethod(torch_chunked.linear_cross_entropy)


class LigerBackend:
    """``liger``: Liger Kernel's loss and Triton statistics (`qtuning_plugin.ops.liger`); CUDA only.

    Constructing it checks nothing (see :func:`liger_problem`).
    """

    name = "liger"
    token_stats = staticmethod(liger.token_stats)
    linear_cross_entropy = staticmethod(liger.linear_cross_entropy)

    def __init__(self, device: Union[torch.device, str] = "cuda"):
        self.description = f"liger-kernel {_version('liger-kernel')}: {liger.describe(torch.device(device))}"


TORCH: Backend = TorchBackend()


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
        liger.fused_linear_cross_entropy()
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
    backend = LigerBackend(device)
    LOG.info(
        "qtuning.backend %s: torch %s, triton %s; %s",
        name,
        torch.__version__,
        _version("triton") or _version("pytorch-triton-rocm"),
        backend.description,
    )
    return backend

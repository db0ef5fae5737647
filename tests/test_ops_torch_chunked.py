"""Parity of the chunked LM-head ops with a naive float64 full-logits reference.

The reference materialises ``logits = hidden @ weight.T + bias`` in float64 from the *same* input
values (for bf16 inputs: the bf16-rounded values, upcast), so only our arithmetic is compared.

Tolerances:

* float32 inputs: ``atol = rtol = 1e-5`` on NLL, entropy, losses and gradients.
* bfloat16 / float16 inputs: the logits come from a half-precision matmul (bf16 keeps 8 mantissa
  bits) before the float32 softmax, so ``atol = 2e-2`` on NLL/entropy/per-token loss (plus
  ``rtol = 2e-2`` on reduced losses), and gradients within ``2e-2 * max|reference|``. Observed bf16
  errors are about 3x below these bounds.
* logits in the hundreds (stability check): ``atol = 1e-3``, the float32 rounding of such logits.

The parity tests run on CPU and, marked ``cuda``, on a CUDA device (skipped without one; a failure
instead under ``QTUNING_REQUIRE_CUDA=1``, see ``conftest.py``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qtuning_plugin.ops import default_chunk_size, linear_cross_entropy, token_stats

from conftest import CUDA

pytestmark = pytest.mark.env_independent  # torch only: `make test` only

IGNORE = -100
FP32_TOL = {"atol": 1e-5, "rtol": 1e-5}
HALF_STATS_ATOL = 2e-2
HALF_GRAD_RTOL = 2e-2
REDUCTIONS = ("sum", "mean", "none")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DEVICES = ("cpu", CUDA)


def make_inputs(n=13, h=16, v=37, dtype=torch.float32, bias=True, ignored=(2, 7), seed=0, device="cpu"):
    """``hidden [n, h]``, ``weight [v, h]``, ``bias [v]`` (or None), ``targets [n]`` with some ignored, on ``device``.

    Logits are O(1) (weight scaled by ``h**-0.5``) so that the softmax is neither flat nor one-hot.
    """
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen).to(device, dtype)
    weight = (torch.randn(v, h, generator=gen) * h**-0.5).to(device, dtype)
    b = (torch.randn(v, generator=gen) * 0.5).to(device, dtype) if bias else None
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[[i for i in ignored if i < n]] = IGNORE
    return hidden, weight, b, targets.to(device)


def reference_logits(hidden, weight, bias):
    logits = hidden.double() @ weight.double().T
    return logits if bias is None else logits + bias.double()


def reference_stats(hidden, weight, bias, targets):
    """Float64 ``(nll, entropy)``, 0 at ignored positions."""
    logits = reference_logits(hidden, weight, bias)
    nll = F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="none")
    logp = logits.log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1) * (targets != IGNORE)
    return nll, entropy


def reference_loss_and_grads(hidden, weight, bias, targets, reduction, grad_out=None):
    """Float64 loss and gradients w.r.t. hidden, weight, bias (``grad_out`` weights a "none" loss)."""
    leaves = [None if t is None else t.double().requires_grad_() for t in (hidden, weight, bias)]
    loss = F.cross_entropy(reference_logits(*leaves), targets, ignore_index=IGNORE, reduction=reduction)
    (loss if grad_out is None else loss * grad_out.double()).sum().backward()
    return loss.detach(), [None if leaf is None else leaf.grad for leaf in leaves]


def assert_close(actual, expected, dtype, *, stat=False, grad=False):
    actual = actual.double()
    if dtype == torch.float32:
        torch.testing.assert_close(actual, expected, **FP32_TOL)
    elif grad:
        torch.testing.assert_close(actual, expected, rtol=0, atol=HALF_GRAD_RTOL * expected.abs().max().item())
    elif stat:
        torch.testing.assert_close(actual, expected, rtol=0, atol=HALF_STATS_ATOL)
    else:
        torch.testing.assert_close(actual, expected, rtol=HALF_GRAD_RTOL, atol=HALF_STATS_ATOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunk_size", [5, 1, None])
def test_token_stats_matches_reference(device, dtype, bias, chunk_size):
    hidden, weight, b, targets = make_inputs(dtype=dtype, bias=bias, device=device)
    nll, entropy = token_stats(hidden, weight, targets, bias=b, ignore_index=IGNORE, chunk_size=chunk_size)
    ref_nll, ref_entropy = reference_stats(hidden, weight, b, targets)
    assert nll.dtype == entropy.dtype == torch.float32 and nll.shape == entropy.shape == (13,)
    assert_close(nll, ref_nll, dtype, stat=True)
    assert_close(entropy, ref_entropy, dtype, stat=True)
    ignored = targets == IGNORE
    assert (nll[ignored] == 0).all() and (entropy[ignored] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_token_stats_large_logits_are_stable(device):
    hidden, weight, b, targets = make_inputs(device=device)
    hidden = hidden * 300  # logits in the hundreds: exp would overflow without the max shift
    nll, entropy = token_stats(hidden, weight, targets, bias=b, chunk_size=4)
    ref_nll, ref_entropy = reference_stats(hidden, weight, b, targets)
    torch.testing.assert_close(nll.double(), ref_nll, atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(entropy.double(), ref_entropy, atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_token_stats_records_no_graph(device):
    hidden, weight, b, targets = make_inputs(device=device)
    nll, entropy = token_stats(hidden.requires_grad_(), weight.requires_grad_(), targets, bias=b.requires_grad_())
    assert not nll.requires_grad and not entropy.requires_grad
    assert nll.grad_fn is None and entropy.grad_fn is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunk_size", [5, 1, None])
def test_linear_cross_entropy_matches_reference(device, reduction, dtype, bias, chunk_size):
    hidden, weight, b, targets = make_inputs(dtype=dtype, bias=bias, device=device)
    grad_out = torch.randn(13, generator=torch.Generator().manual_seed(1)).to(device) if reduction == "none" else None
    ref_loss, ref_grads = reference_loss_and_grads(hidden, weight, b, targets, reduction, grad_out)

    hidden, weight = hidden.requires_grad_(), weight.requires_grad_()
    b = None if b is None else b.requires_grad_()
    loss = linear_cross_entropy(
        hidden, weight, targets, bias=b, ignore_index=IGNORE, reduction=reduction, chunk_size=chunk_size
    )
    assert loss.dtype == torch.float32 and loss.shape == ((13,) if reduction == "none" else ())
    assert_close(loss, ref_loss, dtype, stat=reduction == "none")
    (loss if grad_out is None else loss * grad_out).sum().backward()
    for leaf, ref in zip((hidden, weight, b), ref_grads):
        if leaf is not None:
            assert leaf.grad.dtype == leaf.dtype
            assert_close(leaf.grad, ref, dtype, grad=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_targets_ignored(device, reduction):
    hidden, weight, b, targets = make_inputs(ignored=range(13), device=device)
    leaves = [t.requires_grad_() for t in (hidden, weight, b)]
    loss = linear_cross_entropy(hidden, weight, targets, bias=b, reduction=reduction, chunk_size=5)
    assert torch.equal(loss, torch.zeros_like(loss))
    loss.sum().backward()
    for leaf in leaves:
        assert torch.equal(leaf.grad, torch.zeros_like(leaf))
    nll, entropy = token_stats(hidden, weight, targets, bias=b)
    zeros = torch.zeros(13, device=device)
    assert torch.equal(nll, zeros) and torch.equal(entropy, zeros)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_single_token(device, reduction):
    hidden, weight, b, targets = make_inputs(n=1, ignored=(), device=device)
    ref_loss, ref_grads = reference_loss_and_grads(hidden, weight, b, targets, reduction)
    leaves = [t.requires_grad_() for t in (hidden, weight, b)]
    loss = linear_cross_entropy(hidden, weight, targets, bias=b, reduction=reduction)
    torch.testing.assert_close(loss.double(), ref_loss, **FP32_TOL)
    loss.sum().backward()
    for leaf, ref in zip(leaves, ref_grads):
        torch.testing.assert_close(leaf.grad.double(), ref, **FP32_TOL)
    nll, entropy = token_stats(hidden, weight, targets, bias=b)
    ref_nll, ref_entropy = reference_stats(hidden, weight, b, targets)
    torch.testing.assert_close(nll.double(), ref_nll, **FP32_TOL)
    torch.testing.assert_close(entropy.double(), ref_entropy, **FP32_TOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("trainable", ["hidden", "weight"])
def test_partial_requires_grad(device, reduction, trainable):
    """Frozen LM head (LoRA) or frozen hidden states: only the trainable input gets a gradient."""
    hidden, weight, b, targets = make_inputs(device=device)
    ref_loss, (ref_hidden, ref_weight, _) = reference_loss_and_grads(hidden, weight, b, targets, reduction)
    leaf = (hidden if trainable == "hidden" else weight).requires_grad_()
    loss = linear_cross_entropy(hidden, weight, targets, bias=b, reduction=reduction, chunk_size=4)
    loss.sum().backward()
    torch.testing.assert_close(leaf.grad.double(), ref_hidden if trainable == "hidden" else ref_weight, **FP32_TOL)
    assert (weight if trainable == "hidden" else hidden).grad is None and b.grad is None


@pytest.mark.parametrize("device", DEVICES)
def test_linear_cross_entropy_without_grad(device):
    hidden, weight, b, targets = make_inputs(device=device)
    for leaf in (hidden, weight, b):
        leaf.requires_grad_()
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets, bias=b, reduction="mean")
    assert not loss.requires_grad
    ref_loss, _ = reference_loss_and_grads(hidden.detach(), weight.detach(), b.detach(), targets, "mean")
    torch.testing.assert_close(loss.double(), ref_loss, **FP32_TOL)


def test_default_chunk_size():
    assert default_chunk_size(4096, 32000) == 512  # 2**24 // 32000 = 524 -> 512
    assert default_chunk_size(100, 32000) == 100  # capped at the number of tokens
    assert default_chunk_size(8, 2**25) == 1  # at least one row
    assert default_chunk_size(10**6, 1000) == 16384


@pytest.mark.parametrize("fn", [token_stats, linear_cross_entropy])
@pytest.mark.parametrize(
    "name, change",
    [
        ("hidden", lambda a: {**a, "hidden": a["hidden"][0]}),
        ("weight", lambda a: {**a, "weight": a["weight"][:, :-1]}),
        ("weight", lambda a: {**a, "weight": a["weight"][0]}),
        ("weight dtype", lambda a: {**a, "weight": a["weight"].double()}),
        ("targets", lambda a: {**a, "targets": a["targets"][:-1]}),
        ("targets", lambda a: {**a, "targets": a["targets"][None]}),
        ("bias", lambda a: {**a, "bias": a["bias"][:-1]}),
        ("chunk_size", lambda a: {**a, "chunk_size": 0}),
    ],
)
def test_invalid_arguments(fn, name, change):
    hidden, weight, b, targets = make_inputs()
    args = change({"hidden": hidden, "weight": weight, "targets": targets, "bias": b, "chunk_size": None})
    with pytest.raises(ValueError, match=name):
        fn(args.pop("hidden"), args.pop("weight"), args.pop("targets"), **args)


def test_invalid_reduction():
    hidden, weight, b, targets = make_inputs()
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(hidden, weight, targets, reduction="avg")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [5, None])
def test_label_smoothing_matches_reference(reduction, dtype, chunk_size):
    """``F.cross_entropy(..., label_smoothing=0.1)`` (the semantics of transformers' LabelSmoother)."""
    hidden, weight, b, targets = make_inputs(dtype=dtype)
    grad_out = torch.randn(13, generator=torch.Generator().manual_seed(1)) if reduction == "none" else None
    leaves = [t.double().requires_grad_() for t in (hidden, weight, b)]
    ref_loss = F.cross_entropy(
        reference_logits(*leaves), targets, ignore_index=IGNORE, reduction=reduction, label_smoothing=0.1
    )
    (ref_loss if grad_out is None else ref_loss * grad_out.double()).sum().backward()

    hidden, weight, b = (t.requires_grad_() for t in (hidden, weight, b))
    loss = linear_cross_entropy(
        hidden, weight, targets, bias=b, reduction=reduction, chunk_size=chunk_size, label_smoothing=0.1
    )
    assert_close(loss, ref_loss.detach(), dtype, stat=reduction == "none")
    (loss if grad_out is None else loss * grad_out).sum().backward()
    for leaf, ref in zip((hidden, weight, b), leaves):
        assert_close(leaf.grad, ref.grad, dtype, grad=True)


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_label_smoothing_out_of_range(value):
    hidden, weight, b, targets = make_inputs()
    with pytest.raises(ValueError, match="label_smoothing"):
        linear_cross_entropy(hidden, weight, targets, label_smoothing=value)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_float32_inputs_under_bfloat16_autocast(reduction):
    """As the model's own nn.Linear head under autocast: the matmul in bfloat16 (the reference takes
    the bf16-rounded operands), the softmax in float32; float32 gradients reach the float32 leaves."""
    hidden, weight, b, targets = make_inputs()
    rounded = [t.to(torch.bfloat16) for t in (hidden, weight, b)]
    grad_out = torch.randn(13, generator=torch.Generator().manual_seed(1)) if reduction == "none" else None
    ref_loss, ref_grads = reference_loss_and_grads(*rounded, targets, reduction, grad_out)
    ref_nll, ref_entropy = reference_stats(*rounded, targets)

    leaves = [t.requires_grad_() for t in (hidden, weight, b)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(*leaves[:2], targets, bias=leaves[2], reduction=reduction, chunk_size=5)
        nll, entropy = token_stats(*leaves[:2], targets, bias=leaves[2], chunk_size=5)
    assert loss.dtype == torch.float32
    assert_close(loss, ref_loss, torch.bfloat16, stat=reduction == "none")
    assert_close(nll, ref_nll, torch.bfloat16, stat=True)
    assert_close(entropy, ref_entropy, torch.bfloat16, stat=True)
    (loss if grad_out is None else loss * grad_out).sum().backward()
    for leaf, ref in zip(leaves, ref_grads):
        assert leaf.grad.dtype == torch.float32
        assert_close(leaf.grad, ref, torch.bfloat16, grad=True)

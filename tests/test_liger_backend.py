"""The ``liger`` backend (issue 5): backend resolution, Triton/Liger parity with the torch op,
and coexistence with Liger's patched ``lce_forward``.

Parity tests (``test_parity_*``) compare every Triton/Liger path with
`qtuning_plugin.ops.torch_chunked`: values and gradients, float32 and bfloat16, a vocabulary
that is not a multiple of the kernel block, ignored targets. They run

* on CUDA, in this process, whenever a GPU is available (marked ``cuda``: under
  ``QTUNING_REQUIRE_CUDA=1`` a skip is a failure, see ``conftest.py``);
* on CPU under the Triton interpreter, in a child pytest process running this module, started
  by `test_parity_under_triton_interpreter` with ``TRITON_INTERPRET=1`` in its environment. The
  interpreter must be on before any ``@triton.jit`` kernel is defined, and pytest imports every
  test module into one process, so setting it here would leak into (or miss) other modules'
  Triton imports; a child process keeps it contained.

The child also runs the CPU tests that import liger-kernel (``CHILD_ONLY``), so that its slow
import happens once.

Where triton and liger-kernel are installed, nothing here may skip for want of them: the fixtures
import the modules without catching anything (a kernel that cannot run is an error, not a skip),
and the parent checks in the child's JUnit report that every CPU parity test and every
``CHILD_ONLY`` test passed, `CPU_PARITY_TESTS` of the former.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ElementTree

import pytest
import torch

from qtuning_plugin._logging import LOG
from qtuning_plugin.ops import backends, torch_chunked
from qtuning_plugin.ops.backends import TORCH, liger_problem, resolve_backend

from conftest import random_batch, tiny_llama

CHILD_ENV = "QTUNING_TRITON_INTERPRET_CHILD"
IN_CHILD = os.environ.get(CHILD_ENV) == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_LIGER = importlib.util.find_spec("liger_kernel") is not None
HAS_CUDA = torch.cuda.is_available()

# The reasons a test may skip in the child: it needs CUDA, or it runs in the parent only.
NEEDS_CUDA = "needs CUDA"
PARENT_PROCESS = "runs in the parent process"
DEVICES = [
    pytest.param(
        "cpu",
        marks=pytest.mark.skipif(
            not IN_CHILD, reason="CPU parity runs under TRITON_INTERPRET=1 in test_parity_under_triton_interpreter"
        ),
    ),
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not HAS_CUDA or IN_CHILD, reason=f"{NEEDS_CUDA} (and no Triton interpreter)"),
        ],
    ),
]
# The child runs this whole module: tests that import liger-kernel on CPU run there only (one
# import of liger-kernel, ~10 s, for all of them), and slow tests unrelated to Triton run here only.
CHILD_ONLY = pytest.mark.skipif(
    not IN_CHILD and HAS_TRITON, reason="runs in the child process of test_parity_under_triton_interpreter"
)
PARENT_ONLY = pytest.mark.skipif(IN_CHILD, reason=PARENT_PROCESS)
DTYPES = [torch.float32, torch.bfloat16]
BIASES = [False, True]
LABEL_SMOOTHING = [0.0, 0.1]
V, H = 37, 16  # V is not a multiple of any power-of-two block
# The CPU parity tests the child must pass, one term per test function below.
CPU_PARITY_TESTS = (
    len(DTYPES)  # test_parity_kernel_on_shared_logits
    + len(DTYPES) * len(BIASES)  # test_parity_triton_token_stats
    + 1  # test_parity_triton_extremes
    + 1  # test_parity_inputs_checked_before_any_kernel
    + len(DTYPES) * len(BIASES) * len(LABEL_SMOOTHING)  # test_parity_liger_loss_and_gradients
    + 1  # test_parity_liger_loss_edge_cases
    + len(DTYPES) * len(BIASES)  # test_parity_liger_token_stats
    + 1  # test_parity_trainer_loss_liger_vs_torch
)


def _tolerances(dtype: torch.dtype) -> dict:
    return {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}


def _problem(device: str, dtype: torch.dtype, rows: int = 24, bias: bool = False, seed: int = 0):
    """``hidden [rows, H]``, ``weight [V, H]``, ``bias [V]`` or None, ``targets [rows]`` with ignored rows."""
    generator = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(rows, H, generator=generator) * 2).to(device, dtype)
    weight = torch.randn(V, H, generator=generator).to(device, dtype)
    bias_ = torch.randn(V, generator=generator).to(device, dtype) if bias else None
    targets = torch.randint(0, V, (rows,), generator=generator)
    targets[::5] = -100
    targets[1] = V - 1  # the last column, in the vocabulary's partial block
    return hidden, weight, bias_, targets.to(device)


# ----------------------------------------------- the modules under test (skip only if absent)
@pytest.fixture(scope="module")
def triton_stats():
    """`qtuning_plugin.ops.triton_stats`; skips only where triton is not installed."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    from qtuning_plugin.ops import triton_stats as module

    return module


@pytest.fixture(scope="module")
def liger_ops():
    """`qtuning_plugin.ops.liger`; skips only where triton or liger_kernel is not installed."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    if not HAS_LIGER:
        pytest.skip("liger_kernel is not installed")
    from qtuning_plugin.ops import liger as module

    return module


# ------------------------------------------------------------------- resolve_backend rules
def test_torch_resolves_to_torch_anywhere():
    for device in ("cpu", "meta", torch.device("cpu")):
        assert resolve_backend("torch", device) is TORCH
    assert resolve_backend("torch", "cuda") is TORCH  # no check: the torch op runs on any device


def test_auto_on_cpu_is_torch(caplog):
    with caplog.at_level(logging.INFO, logger=LOG.logger.name):
        assert resolve_backend("auto", torch.device("cpu")) is TORCH
    assert "qtuning.backend auto: torch" in caplog.text and "CUDA" in caplog.text


def test_liger_on_cpu_is_a_clear_error():
    with pytest.raises(ValueError, match=r"qtuning\.backend: liger cannot run here: it needs a CUDA device"):
        resolve_backend("liger", "cpu")


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match=r"qtuning\.backend must be one of auto, liger, torch"):
        resolve_backend("cce", "cpu")


def test_liger_without_liger_kernel_names_the_reason(monkeypatch):
    monkeypatch.setattr(backends, "_triton_problem", lambda: None)
    monkeypatch.setattr(backends, "_liger_problem", lambda: "liger-kernel is not installed")
    with pytest.raises(ValueError, match=r"qtuning\.backend: liger .*liger-kernel is not installed"):
        resolve_backend("liger", "cuda")
    assert resolve_backend("auto", "cuda") is TORCH


@pytest.mark.skipif(HAS_CUDA, reason="checks the reason given on a machine without CUDA")
def test_cuda_device_without_cuda_names_the_reason():
    assert liger_problem("cuda") == "torch.cuda.is_available() is False"
    with pytest.raises(ValueError, match=r"qtuning\.backend: liger .*torch\.cuda\.is_available\(\) is False"):
        resolve_backend("liger", "cuda")


@CHILD_ONLY
@pytest.mark.skipif(not HAS_LIGER, reason="liger_kernel is not installed")
def test_auto_picks_liger_where_it_can_run(monkeypatch, caplog):
    monkeypatch.setattr(backends, "_triton_problem", lambda: None)
    monkeypatch.setattr(backends, "_liger_problem", lambda: None)
    with caplog.at_level(logging.INFO, logger=LOG.logger.name):
        backend = resolve_backend("auto", "cuda")
    assert backend.name == "liger"
    assert re.search(r"liger-kernel \d+\.\d+\.\d+: loss via liger_fused_linear_cross_entropy", caplog.text)
    assert "statistics via" in caplog.text


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason=NEEDS_CUDA)
def test_auto_on_cuda_picks_liger_when_installed():
    expected = "liger" if liger_problem("cuda") is None else "torch"
    assert resolve_backend("auto", "cuda").name == expected


@pytest.mark.parametrize("backend", [backends.TorchBackend, backends.LigerBackend])
def test_backends_have_the_protocol_signatures(backend):
    """Each backend's ops take exactly the parameters (names, kinds, defaults) that `Backend` declares."""

    def parameters(function, skip_self=False):
        found = list(inspect.signature(function).parameters.values())[1 if skip_self else 0 :]
        return [(p.name, p.kind, p.default) for p in found]

    assert isinstance(backend.name, str) and backend.name in backends.BACKENDS
    for method in ("token_stats", "linear_cross_entropy"):
        declared = parameters(getattr(backends.Backend, method), skip_self=True)
        assert parameters(getattr(backend, method)) == declared, method


@PARENT_ONLY
def test_importing_the_package_needs_neither_triton_nor_liger():
    code = (
        "import sys, qtuning_plugin, qtuning_plugin.ops.backends, qtuning_plugin.ops.liger, qtuning_plugin.hf.trainer\n"
        "bad = [m for m in ('triton', 'liger_kernel') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


# ------------------------------------------------------------------------ parity (Triton)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_parity_kernel_on_shared_logits(device, dtype, triton_stats):
    """The kernel alone, on the very logits the reference sees: float32-accurate for both dtypes."""
    hidden, weight, bias, targets = _problem(device, dtype, bias=True)
    logits = hidden @ weight.T
    for block in (8, 16, None):  # 5, 3 and 1 blocks over V = 37
        nll, entropy = triton_stats.logits_stats(logits, targets, bias=bias, block_size=block)
        z = logits.float() + bias.float()
        lse = z.logsumexp(dim=1)
        valid = targets != -100
        ref_nll = torch.where(valid, lse - z.gather(1, targets.clamp(min=0)[:, None]).squeeze(1), 0.0)
        ref_entropy = torch.where(valid, lse - (z.softmax(dim=1) * z).sum(dim=1), 0.0)
        torch.testing.assert_close(nll, ref_nll, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(entropy, ref_entropy, atol=2e-5, rtol=1e-5)
        assert nll.dtype == entropy.dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", BIASES, ids=["nobias", "bias"])
def test_parity_triton_token_stats(device, dtype, bias, triton_stats):
    hidden, weight, bias_, targets = _problem(device, dtype, bias=bias)
    ref = torch_chunked.token_stats(hidden, weight, targets, bias=bias_, chunk_size=7)
    for chunk, block in ((5, 16), (None, None)):
        got = triton_stats.token_stats(hidden, weight, targets, bias=bias_, chunk_size=chunk, block_size=block)
        for value, expected in zip(got, ref):
            assert value.dtype == torch.float32
            torch.testing.assert_close(value, expected.float(), **_tolerances(dtype))
        assert bool((got[0][targets == -100] == 0).all() and (got[1][targets == -100] == 0).all())


@pytest.mark.parametrize("device", DEVICES)
def test_parity_triton_extremes(device, triton_stats):
    """Large logits (entropy ~ 0 must not cancel badly), all rows ignored, no rows."""
    hidden, weight, _, targets = _problem(device, torch.float32)
    nll, entropy = triton_stats.token_stats(hidden * 50, weight, targets, block_size=8)
    ref = torch_chunked.token_stats((hidden * 50).double(), weight.double(), targets)
    torch.testing.assert_close(nll.double(), ref[0], atol=5e-3, rtol=1e-5)
    torch.testing.assert_close(entropy.double(), ref[1], atol=1e-3, rtol=1e-4)
    # Nearly one-hot rows: lse - sum(p z) with |z| ~ 1e3 would leave float32 noise of ~1e-4;
    # the kernel's max-shifted sums give ~0 and never a negative entropy.
    one_hot = (ref[1] < 1e-9) & (targets != -100)
    assert bool(one_hot.any()) and bool((entropy[one_hot] < 1e-6).all()) and bool((entropy >= 0).all())
    ignored = torch.full_like(targets, -100)
    assert all(bool((t == 0).all()) for t in triton_stats.token_stats(hidden, weight, ignored))
    empty = triton_stats.token_stats(hidden[:0], weight, targets[:0])
    assert empty[0].shape == empty[1].shape == (0,)


@pytest.mark.parametrize("device", DEVICES)
def test_parity_inputs_checked_before_any_kernel(device, triton_stats, liger_ops):
    """The Triton and Liger ops reject what the torch op rejects (`contract.validate_inputs`)."""
    hidden, weight, bias, targets = _problem(device, torch.float32, bias=True)
    for op in (triton_stats.token_stats, liger_ops.token_stats, liger_ops.linear_cross_entropy):
        with pytest.raises(ValueError, match="weight dtype"):
            op(hidden, weight.double(), targets)
        with pytest.raises(ValueError, match="targets must be 1-D"):
            op(hidden, weight, targets[:-1])
        with pytest.raises(ValueError, match="bias must be 1-D"):
            op(hidden, weight, targets, bias=bias[:-1])


# ------------------------------------------------------------------------- parity (Liger)
def _loss_and_grads(fn, hidden, weight, bias, targets, scale, label_smoothing):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (hidden, weight, bias)]
    loss = fn(leaves[0], leaves[1], targets, bias=leaves[2], reduction="sum", label_smoothing=label_smoothing)
    (loss * scale).backward()
    return loss.detach(), [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", BIASES, ids=["nobias", "bias"])
@pytest.mark.parametrize("label_smoothing", LABEL_SMOOTHING, ids=["plain", "smoothed"])
def test_parity_liger_loss_and_gradients(device, dtype, bias, label_smoothing, liger_ops):
    """Liger's fused linear CE (reduction=sum) against the torch op: loss and d/d(hidden, weight, bias),
    with and without label smoothing.

    The upstream gradient is 1 / kept tokens, as in our trainer (Liger rescales its stored
    gradients only when it is not 1), and 1.
    """
    hidden, weight, bias_, targets = _problem(device, dtype, bias=bias)
    kept = int((targets != -100).sum())
    # Liger adds a bf16 bias in bf16, the torch op in float32.
    tol = _tolerances(dtype) if not (bias and dtype == torch.bfloat16) else {"atol": 5e-2, "rtol": 1e-2}
    for scale in (1.0 / kept, 1.0):
        args = (hidden, weight, bias_, targets, scale, label_smoothing)
        loss, grads = _loss_and_grads(liger_ops.linear_cross_entropy, *args)
        ref_loss, ref_grads = _loss_and_grads(torch_chunked.linear_cross_entropy, *args)
        torch.testing.assert_close(loss.float(), ref_loss.float(), **tol)
        for grad, ref in zip(grads, ref_grads):
            assert (grad is None) == (ref is None)
            if grad is not None:
                assert grad.dtype == ref.dtype
                # bf16: both ops round the logits' gradient to bf16 before its matmuls, and Liger
                # each chunk's weight-gradient product too (accum_dtype=float32 only widens the sum
                # over chunks), so they differ by a few bf16 steps of the largest entry: measured
                # up to 1.95e-2 * max|ref| (d hidden, with bias), with or without accum_dtype.
                atol = (1e-5 if dtype == torch.float32 else 3e-2) * float(ref.abs().max())
                torch.testing.assert_close(grad.float(), ref.float(), atol=atol, rtol=tol["rtol"])


@pytest.mark.parametrize("device", DEVICES)
def test_parity_liger_loss_edge_cases(device, liger_ops):
    hidden, weight, _, targets = _problem(device, torch.float32)
    frozen = weight.detach()  # LoRA: the LM head does not train, Liger skips its gradient
    x = hidden.clone().requires_grad_(True)
    liger_ops.linear_cross_entropy(x, frozen, targets).backward()
    x_ref = hidden.clone().requires_grad_(True)
    torch_chunked.linear_cross_entropy(x_ref, frozen, targets).backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    # Every target ignored, and no row at all (the trainer's "nothing kept" micro-batch).
    for rows in (slice(None), slice(0)):
        x = hidden[rows].clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        loss = liger_ops.linear_cross_entropy(x, w, torch.full_like(targets[rows], -100))
        loss.backward()
        assert float(loss) == 0.0 and x.grad is not None and float(w.grad.abs().sum()) == 0.0
    mean = liger_ops.linear_cross_entropy(hidden, weight, targets, reduction="mean")
    torch.testing.assert_close(mean, torch_chunked.linear_cross_entropy(hidden, weight, targets, reduction="mean"))
    with pytest.raises(ValueError, match="reduction"):
        liger_ops.linear_cross_entropy(hidden, weight, targets, reduction="none")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", BIASES, ids=["nobias", "bias"])
def test_parity_liger_token_stats(device, dtype, bias, liger_ops):
    """The liger backend's statistics (Liger's scaled CE where usable, else our Triton kernel)."""
    hidden, weight, bias_, targets = _problem(device, dtype, bias=bias)
    nll, entropy = liger_ops.token_stats(hidden, weight, targets, bias=bias_)
    ref_nll, ref_entropy = torch_chunked.token_stats(hidden, weight, targets, bias=bias_)
    tol = _tolerances(dtype)
    if liger_ops.scaled_ce_usable(hidden.device, dtype, bias):  # its entropy comes back in bf16
        tol = {"atol": 5e-2, "rtol": 2e-2}
    torch.testing.assert_close(nll, ref_nll.float(), **tol)
    torch.testing.assert_close(entropy, ref_entropy.float(), **tol)
    assert nll.dtype == entropy.dtype == torch.float32


@PARENT_ONLY
def test_liger_loss_glue_asks_for_float32_accumulation(monkeypatch):
    """Our call of Liger's functional: by keyword, with the head's gradients accumulated in float32
    (not observable on CPU, where Liger rounds each chunk's product to bf16 anyway)."""
    from qtuning_plugin.ops import liger as liger_glue

    calls = []

    def fake_functional(**kwargs):  # keywords only, as ours must be
        calls.append(kwargs)
        return kwargs["input"].float().sum()

    monkeypatch.setattr(liger_glue, "fused_linear_cross_entropy", lambda: fake_functional)
    hidden, weight, bias, targets = _problem("cpu", torch.bfloat16, bias=True)
    loss = liger_glue.linear_cross_entropy(hidden, weight, targets, bias=bias, ignore_index=7, label_smoothing=0.1)
    assert loss == hidden.float().sum()
    (call,) = calls
    assert call["input"] is hidden and call["weight"] is weight and call["bias"] is bias
    assert torch.equal(call["target"], targets)
    assert (call["ignore_index"], call["label_smoothing"], call["reduction"]) == (7, 0.1, "sum")
    assert call["accum_dtype"] is torch.float32


class _FakeScaledCE:
    """Stands in for liger-kernel >= 0.8.2's ``LigerFusedLinearScaledCrossEntropyFunction``, same
    signature: ``apply(_input, weight, target, temperature=1.0, ignore_index=-100,
    m_tiles_per_cluster=1, return_entropy=False)`` -> ``nll [M]`` float32, or ``(nll, entropy)``
    with the entropy in the input dtype (bf16 on its sm90 kernel), 0 at ignored rows."""

    calls: list = []

    @classmethod
    def apply(
        cls, _input, weight, target, temperature=1.0, ignore_index=-100, m_tiles_per_cluster=1, return_entropy=False
    ):
        cls.calls.append(_input.shape[0])
        nll, entropy = torch_chunked.token_stats(_input, weight, target, ignore_index=ignore_index)
        return (nll, entropy.to(_input.dtype)) if return_entropy else nll


@PARENT_ONLY
def test_liger_token_stats_glue_for_scaled_ce(monkeypatch):
    """Our call of Liger's scaled CE: only the rows with a target enter it, float32 out, 0 elsewhere."""
    from qtuning_plugin.ops import liger as liger_glue

    monkeypatch.setattr(liger_glue, "scaled_ce_usable", lambda device, dtype=None, has_bias=False: not has_bias)
    monkeypatch.setattr(liger_glue, "scaled_ce_function", lambda: _FakeScaledCE)
    _FakeScaledCE.calls = []
    hidden, weight, _, targets = _problem("cpu", torch.bfloat16)
    nll, entropy = liger_glue.token_stats(hidden, weight, targets)
    ref_nll, ref_entropy = torch_chunked.token_stats(hidden, weight, targets)
    assert _FakeScaledCE.calls == [int((targets != -100).sum())]
    assert nll.dtype == entropy.dtype == torch.float32
    torch.testing.assert_close(nll, ref_nll)
    torch.testing.assert_close(entropy, ref_entropy, atol=5e-2, rtol=1e-2)
    assert bool((nll[targets == -100] == 0).all() and (entropy[targets == -100] == 0).all())
    ignored = liger_glue.token_stats(hidden, weight, torch.full_like(targets, -100))
    assert _FakeScaledCE.calls == [int((targets != -100).sum())] and not ignored[0].any()


@pytest.mark.cuda
@pytest.mark.cutedsl
@pytest.mark.skipif(IN_CHILD or not HAS_CUDA, reason=NEEDS_CUDA)
def test_parity_liger_scaled_ce_on_hopper(liger_ops):
    """Liger >= 0.8.2's fused scaled cross-entropy (sm90, bf16, no bias) against the torch op."""
    if not liger_ops.scaled_ce_usable(torch.device("cuda")):
        pytest.skip("Liger's fused scaled cross-entropy needs liger-kernel >= 0.8.2 with [cutedsl] on an sm90 GPU")
    hidden, weight, _, targets = _problem("cuda", torch.bfloat16, rows=512)
    nll, entropy = liger_ops.token_stats(hidden, weight, targets)
    ref_nll, ref_entropy = torch_chunked.token_stats(hidden, weight, targets)
    torch.testing.assert_close(nll, ref_nll, atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(entropy, ref_entropy, atol=5e-2, rtol=2e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_parity_trainer_loss_liger_vs_torch(device, liger_ops, tmp_path):
    """The trainer's loss (`QTuningTrainerMixin.compute_loss` on a micro-batch) with the liger backend:
    same selection, loss and LoRA gradients."""
    from transformers import Trainer, TrainingArguments

    from qtuning_plugin import QTuningConfig, QTuningTrainerMixin

    class QTuningTrainer(QTuningTrainerMixin, Trainer):
        pass

    model = tiny_llama().to(device)
    model.train()
    inputs = {key: value.to(device) for key, value in random_batch().items()}
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=device == "cpu", save_strategy="no")
    config = QTuningConfig(sample_keep_ratio=0.5, token_keep_ratio=0.5)
    results = {}
    for backend in (TORCH, backends.LigerBackend(device)):
        events = []
        trainer = QTuningTrainer(model=model, args=args, qtuning_config=config, qtuning_on_selection=events.append)
        trainer.qtuning_engine.backend = backend  # resolve_backend refuses liger on CPU: set it directly
        model.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(model, inputs)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[backend.name] = (loss.detach(), events[-1].selection, grads)
    (loss_t, sel_t, grads_t), (loss_l, sel_l, grads_l) = results["torch"], results["liger"]
    assert torch.equal(sel_t.sample_mask, sel_l.sample_mask) and torch.equal(sel_t.token_mask, sel_l.token_mask)
    torch.testing.assert_close(loss_l, loss_t, atol=1e-5, rtol=1e-5)
    assert grads_t.keys() == grads_l.keys() and grads_t
    for name in grads_t:
        torch.testing.assert_close(grads_l[name], grads_t[name], atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------- the interpreter child process
def _junit_outcomes(path) -> dict[str, str]:
    """``{test name: "passed" | "skipped: <reason>" | "failure" | "error"}`` from a JUnit XML report."""
    outcomes = {}
    for case in ElementTree.parse(path).iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag == "skipped":
                outcome = f"skipped: {child.get('message', '')}"
            elif child.tag in ("failure", "error"):
                outcome = child.tag
        outcomes[case.get("name")] = outcome
    return outcomes


@PARENT_ONLY
def test_parity_under_triton_interpreter(tmp_path):
    """Run this module on CPU in a child pytest with ``TRITON_INTERPRET=1``: every CPU
    ``test_parity_*`` (`CPU_PARITY_TESTS` of them) and every ``CHILD_ONLY`` test must pass there;
    a skip counts as a failure, except of the CUDA and parent-process tests."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    if not HAS_LIGER:
        pytest.skip("liger_kernel is not installed")
    report = tmp_path / "child.xml"
    env = {**os.environ, "TRITON_INTERPRET": "1", CHILD_ENV: "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={report}", __file__]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, cwd=os.path.dirname(__file__))
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"interpreted parity tests failed (rc {proc.returncode}):\n{output[-8000:]}"
    outcomes = _junit_outcomes(report)
    bad_skips = {
        name: outcome for name, outcome in outcomes.items()
        if outcome.startswith("skipped") and NEEDS_CUDA not in outcome and PARENT_PROCESS not in outcome
    }
    assert not bad_skips, f"skipped under the Triton interpreter: {bad_skips}"
    parity = {name: outcome for name, outcome in outcomes.items() if name.startswith("test_parity_") and "cpu" in name}
    passed = [name for name, outcome in parity.items() if outcome == "passed"]
    assert len(passed) == len(parity) == CPU_PARITY_TESTS, f"{len(passed)} of {CPU_PARITY_TESTS} passed: {parity}"
    child_only = ["test_auto_picks_liger_where_it_can_run", "test_final_hidden_states_through_liger_lce_forward"]
    assert all(outcomes.get(name) == "passed" for name in child_only), {name: outcomes.get(name) for name in child_only}
    print(f"TRITON_INTERPRET=1 child: {len(passed)} CPU parity tests passed; {len(outcomes)} tests in all")


# ------------------------------------------------- coexistence with Liger's lce_forward
@CHILD_ONLY
@pytest.mark.skipif(not HAS_LIGER, reason="liger_kernel is not installed")
def test_final_hidden_states_through_liger_lce_forward(tmp_path):
    """With Liger's ``lce_forward`` patched into a Llama (as Axolotl's liger plugin does), our
    forward (no labels, ``logits_to_keep=1``) still yields the decoder's hidden states, the LM head
    runs on the last position only, and the model returns real logits (never ``logits=None``)."""
    from liger_kernel.transformers import apply_liger_kernel_to_llama
    from liger_kernel.transformers.model.llama import lce_forward
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    from qtuning_plugin import QTuningConfig, QTuningTrainerMixin
    from qtuning_plugin.modeling import final_hidden_states

    inputs = random_batch()
    plain, patched = tiny_llama(lora=False), tiny_llama(lora=False)
    # model=...: patch this instance only, so that other tests keep the stock LlamaForCausalLM.forward.
    apply_liger_kernel_to_llama(
        rope=False, cross_entropy=False, fused_linear_cross_entropy=True, rms_norm=False, swiglu=False, model=patched
    )
    assert patched.forward.__func__ is lce_forward
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False)
    torch.manual_seed(1)
    plain = get_peft_model(plain, lora)
    torch.manual_seed(1)
    patched = get_peft_model(patched, lora)

    seen = []
    causal_lm = patched.get_base_model()
    hooks = [
        causal_lm.register_forward_hook(lambda _m, _a, out: seen.append(("output", out))),
        causal_lm.lm_head.register_forward_hook(lambda _m, args, _o: seen.append(("lm_head", args[0].shape))),
    ]
    try:
        for training in (True, False):
            for grad in (True, False):
                plain.train(training), patched.train(training)
                seen.clear()
                with torch.set_grad_enabled(grad):
                    expected = final_hidden_states(plain, inputs)
                    hidden = final_hidden_states(patched, inputs)
                assert hidden.shape == (8, 16, 32) and hidden.requires_grad == grad
                torch.testing.assert_close(hidden, expected, atol=0, rtol=0)
                (_, head_input), (_, output) = seen
                assert head_input == (8, 1, 32)
                assert output.logits is not None and output.logits.shape == (8, 1, 101) and output.loss is None
    finally:
        for hook in hooks:
            hook.remove()

    class QTuningTrainer(QTuningTrainerMixin, Trainer):
        pass

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, save_strategy="no")
    config = QTuningConfig(sample_keep_ratio=0.5, token_keep_ratio=0.5)
    losses = []
    for model in (plain, patched):
        model.train()
        model.zero_grad(set_to_none=True)
        loss = QTuningTrainer(model=model, args=args, qtuning_config=config).compute_loss(model, inputs)
        loss.backward()
        losses.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(losses[1][0], losses[0][0], atol=0, rtol=0)
    assert losses[0][1].keys() == losses[1][1].keys() and losses[0][1]
    for name, grad in losses[0][1].items():
        torch.testing.assert_close(losses[1][1][name], grad, atol=0, rtol=0)


# ------------------------------------------------------------ benchmarks/gpu_step.py on CPU
@PARENT_ONLY
def test_gpu_step_benchmark_cpu_paths(capsys, monkeypatch):
    """The GPU benchmark imports, exits 0 with a message without CUDA, and its logic runs on CPU."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_step.py"
    monkeypatch.syspath_prepend(str(path.parent))  # as `python benchmarks/gpu_step.py` has it
    spec = importlib.util.spec_from_file_location("gpu_step", path)
    gpu_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_step)
    if not HAS_CUDA:
        assert gpu_step.main([]) == 0
        assert "needs a CUDA GPU" in capsys.readouterr().out
    argv = ["--device", "cpu", "--tiny", "--layers", "1", "--seq", "16", "--vocab", "97"]
    assert gpu_step.main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["baseline"] == "full/torch"  # no interpreter here: the liger arms are skipped
    assert set(summary["step_time_ratio"]) == {
        "full/torch", "0.25x0.5/torch", "consumer/full_mbs1/torch", "consumer/step_0.25x0.5/torch"}
    assert all("skipped" in summary["results"][f"{arm}/liger"] for arm in ("full", "0.25x0.5"))
    assert "skipped" in summary["stats_pass"]["liger"] and summary["stats_pass"]["torch"]["time_ratio"] > 0

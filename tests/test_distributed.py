"""Data-parallel Q-Tuning on 2 CPU ranks (gloo, torchrun): global triage, DDP, FSDP1 and FSDP2 steps.

One torchrun launch (`dist_worker.py`) runs every scenario; each test compares
what the ranks saw with one process on the concatenated batch.
"""

import os
import subprocess
import sys

import pytest
import torch

from qtuning_plugin import QTuningConfig, select
from qtuning_plugin.modeling import final_hidden_states, lm_head_parameters, shifted_targets, unwrap_causal_lm
from qtuning_plugin.ops.backends import TORCH
from qtuning_plugin.trainer import kept_token_loss

import dist_worker as worker
from conftest import tiny_llama

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """``[rank0, rank1]``: what each rank of one 2-process torchrun launch saved."""
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
        os.path.join(HERE, "dist_worker.py"), str(out), "fsdp",
    ]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


# ------------------------------------------------------------- select + gather
@pytest.mark.parametrize("case", worker.SELECT_CASES)
def test_gathered_select_equals_one_process_on_the_concatenated_batch(ranks, case):
    batch, first, ratio, seed = case
    nll, entropy, mask = worker.select_batch(batch, seed)
    reference = select(nll, entropy, mask, QTuningConfig(sample_keep_ratio=ratio, token_keep_ratio=0.5))
    for rank, rows in ((0, slice(0, first)), (1, slice(first, batch))):
        got = ranks[rank]["select"][case]
        assert torch.equal(got["global_keep"], reference.triage.keep)
        assert torch.equal(got["sample_mask"], reference.sample_mask[rows])
        assert torch.equal(got["q2"], reference.q2[rows])
        assert torch.equal(got["token_mask"], reference.token_mask[rows])
        for key in ("qtuning/samples_q1", "qtuning/samples_q2", "qtuning/samples_q3", "qtuning/samples_q4",
                    "qtuning/alpha", "qtuning/ppl_hi", "qtuning/ent_lo", "qtuning/kept_sample_frac"):
            assert got["stats"][key] == pytest.approx(reference.stats[key], nan_ok=True)


# ------------------------------------------------------------------ DDP step
def _reference(name, lora=True):
    """One process, whole batch: the selection, and the gradient of the mean of the two ranks' losses."""
    seed, config, no_targets = worker.DDP_CASES[name]
    batch = worker.ddp_batch(seed, no_targets)
    model = tiny_llama(seed=0, lora=lora)
    model.train()
    with torch.no_grad():
        hidden = final_hidden_states(model, batch)
    weight, bias = lm_head_parameters(unwrap_causal_lm(model))
    targets = shifted_targets(batch["labels"])
    nll, entropy = TORCH.token_stats(hidden.flatten(0, 1), weight, targets.flatten())
    shape = targets.shape
    selection = select(nll.view(shape), entropy.view(shape), targets != -100, QTuningConfig(**config))

    hidden = final_hidden_states(model, batch)
    n = worker.DDP_RANK_ROWS
    losses = [
        kept_token_loss(TORCH, hidden[r * n : (r + 1) * n], weight, bias, targets[r * n : (r + 1) * n],
                        selection.token_mask[r * n : (r + 1) * n])
        for r in range(2)
    ]
    (sum(losses) / 2).backward()  # DDP and FSDP average the ranks' gradients
    grads = {k: p.grad for k, p in model.named_parameters() if p.requires_grad}
    return selection, losses, grads


@pytest.mark.parametrize("name", list(worker.DDP_CASES))
def test_ddp_step_selects_as_one_process_and_synchronises_gradients(ranks, name):
    selection, losses, grads = _reference(name)
    n = worker.DDP_RANK_ROWS
    kept_per_rank = [int(selection.sample_mask[r * n : (r + 1) * n].sum()) for r in range(2)]
    if name == "basic":
        assert min(kept_per_rank) > 0
    else:  # rank 1 trains on no sample at all, and the step must still complete (no hang)
        assert kept_per_rank[0] > 0 and kept_per_rank[1] == 0
    for rank in range(2):
        got = ranks[rank]["ddp"][name]
        rows = slice(rank * n, (rank + 1) * n)
        assert torch.equal(got["global_keep"], selection.triage.keep)
        assert torch.equal(got["sample_mask"], selection.sample_mask[rows])
        assert torch.equal(got["token_mask"], selection.token_mask[rows])
        torch.testing.assert_close(got["loss"], losses[rank].detach(), atol=1e-5, rtol=1e-5)
        assert got["grads"].keys() == grads.keys()
        for key, grad in grads.items():
            assert got["grads"][key] is not None, key
            torch.testing.assert_close(got["grads"][key], grad, atol=1e-5, rtol=1e-4)
    if kept_per_rank[1] == 0:
        assert ranks[1]["ddp"][name]["loss"].item() == 0.0
    for key in grads:  # synchronised: bit-identical on both ranks
        assert torch.equal(ranks[0]["ddp"][name]["grads"][key], ranks[1]["ddp"][name]["grads"][key])


# ---------------------------------------------------------------- FSDP steps
@pytest.mark.parametrize("name", list(worker.FSDP_RUNS))
def test_fsdp_step_selects_and_trains_as_one_process(ranks, name):
    """FSDP2 (root resharded after forward) and FSDP1 (LM head in its own unit), CPU/gloo:
    the LM head's full weight is used for the statistics and the loss, and every gradient
    (LoRA, or every parameter when fully fine-tuned) is that of one process."""
    for rank in range(2):
        assert "error" not in ranks[rank]["fsdp"][name], ranks[rank]["fsdp"][name].get("error")
    lora = worker.FSDP_RUNS[name][1]
    selection, losses, grads = _reference("basic", lora=lora)
    if not lora:
        assert "lm_head.weight" in grads and "model.embed_tokens.weight" in grads
    n = worker.DDP_RANK_ROWS
    for rank in range(2):
        got = ranks[rank]["fsdp"][name]
        rows = slice(rank * n, (rank + 1) * n)
        assert torch.equal(got["sample_mask"], selection.sample_mask[rows])
        assert torch.equal(got["token_mask"], selection.token_mask[rows])
        torch.testing.assert_close(got["loss"], losses[rank].detach(), atol=1e-5, rtol=1e-5)
        assert got["grads"].keys() == grads.keys()
        for key, grad in grads.items():
            torch.testing.assert_close(got["grads"][key], grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{key}: {m}")

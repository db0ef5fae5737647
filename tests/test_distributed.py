"""Data-parallel Q-Tuning on 2 CPU ranks (gloo, torchrun): global triage, DDP, FSDP1 and FSDP2 steps,
and `Trainer.train` runs under DDP, DeepSpeed ZeRO-2 and ZeRO-3.

One torchrun launch (`dist_worker.py`) runs every scenario; each test compares
what the ranks saw with one process on the concatenated batch.
"""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from qtuning_plugin import QTuningConfig, select
from qtuning_plugin.core.triage import NO_TARGET, QUADRANTS
from qtuning_plugin.modeling import final_hidden_states, lm_head_parameters, shifted_targets, unwrap_causal_lm
from qtuning_plugin.ops.backends import TORCH
from qtuning_plugin.engine import kept_token_loss
from qtuning_plugin.sample_key import sample_key

import dist_worker as worker
from conftest import tiny_llama
from reference import check_same_decisions

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """``[rank0, rank1]``: what each rank of one 2-process torchrun launch saved."""
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    # DeepSpeed JIT-builds its CPU shared-memory collectives (`deepspeed_shm_comm`, ~30 s of g++) on its
    # first start: cache the build with the virtual environment, so that it happens once per environment.
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
        os.path.join(HERE, "dist_worker.py"), str(out), "fsdp", "trainer",
    ]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
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
def _one_process_selection(model, batch, config):
    """What one process selects on the whole ``batch``: ``(selection, targets)``."""
    model.train()
    with torch.no_grad():
        hidden = final_hidden_states(model, batch)
    weight, bias = lm_head_parameters(unwrap_causal_lm(model))
    targets = shifted_targets(batch["labels"])
    nll, entropy = TORCH.token_stats(hidden.flatten(0, 1), weight, targets.flatten(), bias=bias)
    shape = targets.shape
    return select(nll.view(shape), entropy.view(shape), targets != -100, QTuningConfig(**config)), targets


def _reference(name, lora=True):
    """One process, whole batch: the selection, and the gradient of the mean of the two ranks' losses."""
    seed, config, no_targets = worker.DDP_CASES[name]
    batch = worker.ddp_batch(seed, no_targets)
    model = tiny_llama(seed=0, lora=lora)
    selection, targets = _one_process_selection(model, batch, config)
    weight, bias = lm_head_parameters(unwrap_causal_lm(model))

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


# ------------------------------------------------- Trainer runs: DDP, ZeRO-2, ZeRO-3
def _trainer_run(ranks, scope, name):
    """``[rank0, rank1]`` records of one `worker.TRAINER_RUNS` run."""
    if worker.TRAINER_RUNS[name][0] != "ddp" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (it is in the `test` extra)")
    runs = [ranks[rank]["trainer"][scope][name] for rank in range(2)]
    for run in runs:
        assert "error" not in run, run.get("error")
    config = worker.deepspeed_config(worker.TRAINER_RUNS[name][0])
    expected = ("DistributedDataParallel", None)
    if config is not None:
        zero = config["zero_optimization"]
        expected = ("DeepSpeedEngine", {"stage": zero["stage"], "offload": "offload_param" in zero})
    assert all(run["wrapper"] == expected for run in runs), [run["wrapper"] for run in runs]
    return runs


def _triage_units(scope, fetched):
    """``[(optimizer step, [rows of rank 0, rows of rank 1])]``, one per triage (one `select` call per rank).

    ``fetched[rank]`` are the dataset rows that rank fetched, in order: micro-batches of
    `TRAINER_MICRO_BATCH` rows, `TRAINER_ACCUMULATION` of them per optimizer step.
    """
    size, accumulation = worker.TRAINER_MICRO_BATCH, worker.TRAINER_ACCUMULATION
    per_rank = [[rows[i : i + size] for i in range(0, worker.TRAINER_STEPS * accumulation * size, size)] for rows in fetched]
    if scope == "micro_batch":
        return [(k // accumulation, [micro[k] for micro in per_rank]) for k in range(len(per_rank[0]))]
    assert scope == "step", scope
    return [
        (step, [sum(micro[step * accumulation : (step + 1) * accumulation], []) for micro in per_rank])
        for step in range(worker.TRAINER_STEPS)
    ]


def _decision_lines(step: int, rows: dict, indices: list[int], selection) -> list[dict]:
    """The decision log's lines of one triage of the dataset ``rows`` at ``indices``: its samples with
    a trainable token, each keyed by its row's tokens (padding left out)."""
    lines = []
    for i, row in enumerate(indices):
        if int(selection.quadrant[i]) == NO_TARGET:
            continue
        lines.append({
            "step": step,
            "key": sample_key(rows["input_ids"][row][rows["attention_mask"][row] != 0]),
            "quadrant": QUADRANTS[int(selection.quadrant[i])],
            "ppl": float(selection.ppl[i]),
            "ent": float(selection.ent[i]),
            "trainable_tokens": int((rows["labels"][row][1:] != -100).sum()),
            "kept_tokens": int(selection.token_mask[i].sum()),
            "filled": bool(selection.filled[i]),
        })
    return lines


@pytest.mark.parametrize("scope", worker.TRAINER_SCOPES)
@pytest.mark.parametrize("name", list(worker.TRAINER_RUNS))
def test_trainer_run_selects_as_one_process_on_the_concatenated_batch(ranks, scope, name):
    """At every triage of a few `Trainer.train` steps, each rank's selection is its share of what one
    process selects on the ranks' rows together, with the parameters the run had then; a rank that
    keeps no sample (no trainable token in its micro-batch) trains on and nothing hangs. The main
    process's decision log holds every rank's samples of each triage, keyed by the rows' tokens."""
    runs = _trainer_run(ranks, scope, name)
    fetched = [run["fetched"] for run in runs]
    assert not set(fetched[0]) & set(fetched[1])
    units = _triage_units(scope, fetched)
    model_kind = worker.TRAINER_RUNS[name][1]
    model, rows = worker.trainer_model(model_kind), worker.trainer_rows()
    config = worker.qtuning_settings(scope)
    step_params = [{}] + runs[0]["params"]  # the parameters each optimizer step started from
    assert len(step_params) == worker.TRAINER_STEPS + 1
    kept_per_rank, decisions = [], []
    for index, (step, rank_rows) in enumerate(units):
        assert not model.load_state_dict(step_params[step], strict=False).unexpected_keys
        batch = {key: value[rank_rows[0] + rank_rows[1]] for key, value in rows.items()}
        reference, _ = _one_process_selection(model, batch, config)
        first = len(rank_rows[0])
        for rank, share in ((0, slice(0, first)), (1, slice(first, None))):
            got = runs[rank]["selections"][index]
            assert torch.equal(got["global_keep"], reference.triage.keep), (index, rank)
            assert torch.equal(got["sample_mask"], reference.sample_mask[share]), (index, rank)
            assert torch.equal(got["token_mask"], reference.token_mask[share]), (index, rank)
        kept_per_rank.append([int(reference.sample_mask[:first].sum()), int(reference.sample_mask[first:].sum())])
        decisions += _decision_lines(step + 1, rows, rank_rows[0] + rank_rows[1], reference)
    for run in runs:
        assert len(run["selections"]) == len(units)
    check_same_decisions(runs[0]["decisions"], decisions, rel=1e-5)
    if scope == "micro_batch":  # rank 1's first micro-batch has no trainable token: it keeps nothing there
        assert any(min(kept) == 0 < max(kept) for kept in kept_per_rank), kept_per_rank


@pytest.mark.parametrize("scope", worker.TRAINER_SCOPES)
@pytest.mark.parametrize("name", [name for name, (engine, _) in worker.TRAINER_RUNS.items() if engine != "ddp"])
def test_zero_run_trains_the_parameters_of_the_ddp_run(ranks, scope, name):
    """After every optimizer step, ZeRO-2/3 hold the parameters the DDP run holds, on both ranks."""
    runs = _trainer_run(ranks, scope, name)
    model_kind = worker.TRAINER_RUNS[name][1]
    reference = _trainer_run(ranks, scope, f"ddp_{model_kind}")[0]["params"]
    initial = {key: p.detach() for key, p in worker.trainer_model(model_kind).named_parameters() if p.requires_grad}
    assert len(runs[0]["params"]) == len(reference) == worker.TRAINER_STEPS
    assert reference[-1].keys() == initial.keys()
    assert all(not torch.equal(reference[-1][key], initial[key]) for key in initial)  # every parameter trained
    for step, expected in enumerate(reference):
        for run in runs:
            assert run["params"][step].keys() == expected.keys()
            for key, value in expected.items():
                torch.testing.assert_close(
                    run["params"][step][key], value, atol=1e-5, rtol=1e-4, msg=lambda m: f"step {step + 1}, {key}: {m}"
                )

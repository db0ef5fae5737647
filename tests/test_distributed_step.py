"""Step-scope triage under DDP (2 CPU ranks, gloo, torchrun, the real Trainer loop): the same
selections, logged losses and parameters as one process on the concatenated mini-batches, and
the same number of training passes on every rank."""

import os
import subprocess
import sys

import pytest
import torch

import dist_step_worker as worker

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist_step")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(worker.WORLD), "--standalone",
               os.path.join(HERE, "dist_step_worker.py"), str(out)]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(worker.WORLD)]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process, one micro-batch per step holding every rank's rows (rank-major)."""
    out = str(tmp_path_factory.mktemp("single"))
    per_step = worker.MICRO_BATCH * worker.ACCUMULATION * worker.WORLD
    return {case: worker.train(case, out, per_step, 1, order=worker.rank_major_order()) for case in worker.CASES}


@pytest.mark.parametrize("case", list(worker.CASES))
def test_ddp_step_scope_trains_as_one_process_on_the_concatenated_batch(ranks, single, case):
    reference = single[case]
    for rank in range(worker.WORLD):
        got = ranks[rank][case]
        for step_keep, expected_keep in zip(got["keep"], reference["keep"]):
            assert (step_keep is None) == (expected_keep is None)
            if expected_keep is not None:
                assert torch.equal(step_keep, expected_keep)
        for name, param in reference["params"].items():
            torch.testing.assert_close(got["params"][name], param, atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    # Every rank ran the same passes; each pass of at most MICRO_BATCH rows.
    passes = [ranks[r][case]["forwards_with_grad"] for r in range(worker.WORLD)]
    assert len(passes[0]) == len(passes[1])
    assert all(0 < rows <= worker.MICRO_BATCH for rows in passes[0] + passes[1])
    # The logged loss (rank 0's log, the mean over ranks) is the single process's.
    got_log, reference_log = ranks[0][case]["log"], reference["log"]
    assert [e["loss"] for e in got_log] == pytest.approx([e["loss"] for e in reference_log], rel=1e-5, abs=1e-7)
    assert [e["qtuning/kept_sample_frac"] for e in got_log if "qtuning/kept_sample_frac" in e] == pytest.approx(
        [e["qtuning/kept_sample_frac"] for e in reference_log if "qtuning/kept_sample_frac" in e]
    )


def test_the_quarter_case_keeps_no_local_sample_on_one_rank_in_its_first_step(single):
    """The case where micro-batch triage would leave a rank idle: both kept samples of the first step
    come from one rank's rows, yet both ranks train (checked above: same passes, all non-empty)."""
    keep = single["quarter"]["keep"][0]
    per_rank = worker.MICRO_BATCH * worker.ACCUMULATION
    assert int(keep.sum()) == 2
    assert sorted(int(keep[r * per_rank : (r + 1) * per_rank].sum()) for r in range(worker.WORLD)) == [0, 2]


def test_a_step_without_trainable_tokens_runs_one_empty_pass_per_rank(ranks):
    """Zero loss, and (with the parameters checked above) no update; no rank hangs."""
    first_step = ranks[0]["first_step_untrainable"]["log"][0]
    assert first_step["loss"] == 0.0
    assert first_step["qtuning/training_passes"] == 1.0


def test_a_window_pools_the_global_mini_batches_of_earlier_steps(ranks, single):
    """``triage_window: 2``: the second step's thresholds rest on both steps' 16 global samples on
    every rank (checked against one process above), and it keeps another pair than without a window."""
    for rank in range(worker.WORLD):
        logged = ranks[rank]["window"]["log"]
        assert [entry["qtuning/window_samples"] for entry in logged] == [8.0, 16.0]
    first, second = single["window"]["keep"]
    assert torch.equal(first, single["quarter"]["keep"][0])
    assert int(second.sum()) == 2 and not torch.equal(second, single["quarter"]["keep"][1])

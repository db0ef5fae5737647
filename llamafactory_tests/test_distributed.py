"""Two CPU ranks (gloo) under ``llamafactory-cli``'s launch rules (``FORCE_TORCHRUN=1``,
``NPROC_PER_NODE=2``): torchrun starts our worker on every rank, one triage covers both ranks'
samples, and the run equals one process at the same global batch (gradient accumulation doubled).

With ``disable_shuffling: true`` and one row per micro-batch, the step's global micro-batches are
the same 8 samples in both runs: the single process's i-th is rank ``i % 2``'s ``i // 2``-th.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from lf_run import Run, check_finished, example_config, run

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference import check_decisions_of_selections, check_selection_records  # noqa: E402  (SPEC sections 4-5)

WORLD, STEPS, ACCUMULATION = 2, 3, 4
MINI_BATCH = WORLD * ACCUMULATION
SECTION = {"sample_keep_ratio": 0.25, "token_keep_ratio": 0.5, "log_decisions": True}
SAMPLE_FIELDS = ("ppl", "ent", "trainable", "kept_tokens", "keep", "q2")
# Statistics of the whole (gathered) mini-batch; token counts and passes are each rank's own.
GLOBAL_METRICS = [
    f"qtuning/{name}"
    for name in ("samples_q1", "samples_q2", "samples_q3", "samples_q4", "samples_middle", "samples_filled",
                 "kept_sample_frac", "alpha", "ppl_hi", "ppl_lo", "ent_lo", "ent_hi", "ppl_kept_mean", "ent_kept_mean")
]


def _train(model: Path, workdir: Path, accumulation: int, env: dict) -> Run:
    config = example_config(
        workdir, model, steps=STEPS, gradient_accumulation_steps=accumulation, disable_shuffling=True, qtuning=SECTION
    )
    return run(["qtuning-llamafactory", "train", str(config)], workdir, probe=True, extra_env=env)


@pytest.fixture(scope="module")
def ranks(tiny_model, tmp_path_factory) -> Run:
    env = {"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": str(WORLD)}
    return _train(tiny_model, tmp_path_factory.mktemp("ranks"), ACCUMULATION, env)


@pytest.fixture(scope="module")
def single(tiny_model, tmp_path_factory) -> Run:
    return _train(tiny_model, tmp_path_factory.mktemp("single"), WORLD * ACCUMULATION, {})


def merged_selections(ranks: Run) -> list[dict]:
    """Each step's records of both ranks, concatenated in rank order (the order of the gathered triage)."""
    per_rank = [ranks.selections(rank) for rank in range(WORLD)]
    assert [len(records) for records in per_rank] == [STEPS] * WORLD
    return [
        {key: sum((record[key] for record in step), []) for key in SAMPLE_FIELDS}
        for step in zip(*per_rank)
    ]


def decisions(run: Run) -> list[dict]:
    from qtuning_plugin.atomic_files import read_jsonl
    from qtuning_plugin.decisions import DECISIONS_NAME

    return read_jsonl(str(run.output_dir / DECISIONS_NAME))


def test_every_rank_runs_qtuning_in_one_triage(ranks):
    check_finished(ranks)
    assert f"Initializing {WORLD} distributed tasks" in ranks.output
    assert ranks.output.count("Q-Tuning is active") == WORLD, ranks.tail()
    merged = merged_selections(ranks)
    assert all(len(step["ppl"]) == MINI_BATCH for step in merged)
    check_selection_records(merged, SECTION["sample_keep_ratio"], SECTION["token_keep_ratio"])
    # The main process's decision log: both ranks' samples of every triage, in rank order.
    check_decisions_of_selections(decisions(ranks), merged)


def test_no_rank_leaves_its_ddp_model_to_interpreter_shutdown(ranks):
    """Freed at shutdown, the model's gloo process group can abort a rank after a finished run."""
    check_finished(ranks)
    for rank in range(WORLD):
        alive = json.loads((ranks.probe_dir / f"alive_at_exit.rank{rank}.json").read_text(encoding="utf-8"))
        assert alive == {"ddp_models": 0}, f"rank {rank}: {alive}"


def test_two_ranks_select_and_train_as_one_process_at_the_same_global_batch(ranks, single):
    check_finished(ranks)
    check_finished(single)
    expected = single.selections()
    assert len(expected) == STEPS and all(len(step["ppl"]) == MINI_BATCH for step in expected)
    per_rank = [ranks.selections(rank) for rank in range(WORLD)]
    for step in range(STEPS):
        for i in range(MINI_BATCH):
            got = {key: per_rank[i % WORLD][step][key][i // WORLD] for key in SAMPLE_FIELDS}
            want = {key: expected[step][key][i] for key in SAMPLE_FIELDS}
            for key in ("keep", "q2", "trainable", "kept_tokens"):
                assert got[key] == want[key], (step, i, key)
            assert got["ppl"] == pytest.approx(want["ppl"], rel=1e-5)
            assert got["ent"] == pytest.approx(want["ent"], rel=1e-5)
    # The same decisions about the same samples (the single process's in another order).
    by_sample = [{(line["step"], line["key"]): line["quadrant"] for line in decisions(run)} for run in (ranks, single)]
    assert len(by_sample[0]) == STEPS * MINI_BATCH and by_sample[0] == by_sample[1]
    ranks_logs, single_logs = ranks.train_logs(), single.train_logs()
    assert len(ranks_logs) == len(single_logs) == STEPS
    for got, want in zip(ranks_logs, single_logs):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert {key: got[key] for key in GLOBAL_METRICS if key in want} == pytest.approx(
            {key: want[key] for key in GLOBAL_METRICS if key in want}, rel=1e-5
        )

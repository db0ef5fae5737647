"""Smoke test of the selection replay: ``benchmarks/quality/selection.py --quick`` end to end
(subprocess, CPU, SmolLM2-135M-Instruct), its numbers recomputed from the scores it dumps with the
SPEC transcription in ``tests/reference.py``.

Like ``test_quality_real.py`` it runs where ``QTUNING_REAL_SMOKE=1`` (``make test``, ``make
mutation``), on ``$QTUNING_SMOLLM2_DIR`` or the folder `qtuning_plugin.smollm2.ensure_model` caches.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "tests"), str(Path(__file__).resolve().parent)]
from reference import reference_kept_tokens, reference_pooled_triage, reference_triage  # noqa: E402
from test_quality_real import model_dir  # noqa: E402  (QTUNING_REAL_SMOKE and the model folder)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "benchmarks" / "quality" / "selection.py"
GROUPS = 200  # --quick's groups per size, all dumped
BUDGETS = {"25x50": (0.25, 0.5), "12.5x50": (0.125, 0.5), "25x70": (0.25, 0.7)}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out, model = tmp_path_factory.mktemp("quality_selection"), model_dir()
    proc = subprocess.run(
        [sys.executable, str(RUN), "--model", str(model), "--quick", "--out", str(out), "--dump-groups", str(GROUPS),
         "--cache-dir", str(out / "cache")],  # scored here, not read from an earlier run's cache
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "results_selection_quick.json").read_text()), out, model


def reference_counts(dump: dict, size: str, sample_ratio: float, token_ratio: float) -> dict:
    """Per-group counts of the dumped groups by the SPEC transcription, summed."""
    kinds, sums = dump["kinds"], dict.fromkeys(
        ("groups", "kept", "corrupted", "filled", "cap", "bad", "paper", "reversed", "over_target"), 0)
    for members in dump["groups"][size]:
        t = reference_triage([dump["ppl"][i] for i in members], [dump["ent"][i] for i in members], sample_ratio)
        kept = [i for i, k in zip(members, t.keep) if k]
        before_fill = (len(kept) - sum(t.filled)) / len(members)
        sums["groups"] += 1
        sums["kept"] += len(kept)
        sums["corrupted"] += sum(kinds[i] != "clean" for i in kept)
        sums["filled"] += sum(t.filled)
        sums["cap"] += t.iterations == 10 and abs(before_fill - sample_ratio) >= 0.01
        sums["over_target"] += len(kept) > t.target and any(t.filled)  # the fill-up adds up to the target only
        for i, q2 in zip(members, t.q2):
            if q2:
                bad = dump["bad"][i]
                sums["bad"] += sum(bad)
                for rule, highest in (("paper", True), ("reversed", False)):
                    left = reference_kept_tokens(dump["nll"][i], [True] * len(bad), token_ratio, prune_highest=highest)
                    sums[rule] += sum(b and k for b, k in zip(bad, left))
    return sums


def test_replay_matches_the_spec_transcription_on_every_group(quick_run):
    """Kept-noise share, fill-up share, cap share and the paper's and reversed token pruning of all
    dumped groups, recomputed one group at a time with tests/reference.py."""
    result, _, _ = quick_run
    dump = result["dump"]["base"]["30%"]
    for budget, (sample_ratio, token_ratio) in BUDGETS.items():
        for size in dump["groups"]:
            assert len(dump["groups"][size]) == GROUPS
            ref = reference_counts(dump, size, sample_ratio, token_ratio)
            cell = result["cells"]["base"]["30%"][budget][size]
            assert ref["over_target"] == 0
            assert math.isclose(cell["kept_corrupted_share"]["value"], ref["corrupted"] / ref["kept"]), (budget, size)
            assert math.isclose(cell["fill_up_share"]["value"], ref["filled"] / ref["kept"]), (budget, size)
            assert math.isclose(cell["cap_share"]["value"], ref["cap"] / ref["groups"], abs_tol=1e-12), (budget, size)
            assert math.isclose(cell["kept_per_group"]["value"], ref["kept"] / ref["groups"]), (budget, size)
            if ref["bad"]:
                for rule in ("paper", "reversed"):
                    assert math.isclose(cell[f"bad_tokens_left_{rule}"]["value"], ref[rule] / ref["bad"]), (budget, size, rule)
            low, high = cell["kept_corrupted_share"]["ci"]
            assert low <= cell["kept_corrupted_share"]["value"] <= high


def test_kept_count_is_the_budget_unless_the_quadrants_keep_more(quick_run):
    """Every group keeps at least round(r x group); the fill-up, when it adds, stops at exactly that."""
    result, _, _ = quick_run
    for budget, (sample_ratio, _) in BUDGETS.items():
        for size, cell in result["cells"]["base"]["30%"][budget].items():
            if size == "all":
                continue
            target = max(1, round(sample_ratio * int(size)))
            assert cell["kept_per_group"]["value"] >= target, (budget, size)
            if cell["fill_up_share"]["value"] > 0:
                assert cell["kept_at_target_share"]["value"] > 0, (budget, size)


def test_window_replay_matches_the_transcription(quick_run):
    """The 4-step window arm at 25%, every dumped run of steps recomputed with
    `reference_pooled_triage` (docs/algorithm.md section 4a): kept-noise share and kept / K; and
    every arm that holds the budget keeps exactly K."""
    result, _, _ = quick_run
    dump = result["dump"]["base"]["30%"]
    warm, kinds = dump["uncounted_first_steps"], dump["kinds"]
    for size, runs in dump["chains"].items():
        kept = corrupted = target = 0
        for steps in runs:
            for index, members in enumerate(steps):
                earlier = [i for past in steps[max(0, index - 3):index] for i in past]
                t = reference_pooled_triage([dump["ppl"][i] for i in members], [dump["ent"][i] for i in members],
                                            [dump["ppl"][i] for i in earlier], [dump["ent"][i] for i in earlier],
                                            0.25, hold=True)
                if index >= warm:
                    chosen = [i for i, k in zip(members, t.keep) if k]
                    kept, target = kept + len(chosen), target + t.target
                    corrupted += sum(kinds[i] != "clean" for i in chosen)
        cell = result["windows"]["base"]["25x50"][size]
        assert math.isclose(cell["4"]["kept_corrupted_share"]["value"], corrupted / kept), size
        assert kept == target and cell["4"]["kept_over_target"]["value"] == 1.0
        for arm in ("1 held", "16"):
            assert cell[arm]["kept_over_target"]["value"] == 1.0, (size, arm)
        assert cell["1"]["kept_over_target"]["value"] >= 1.0


def test_clean_data_keeps_no_corrupted_sample_and_base_rates_are_the_data(quick_run):
    result, _, _ = quick_run
    dump = result["dump"]["base"]["30%"]
    rate = sum(k != "clean" for k in dump["kinds"]) / len(dump["kinds"])
    assert math.isclose(result["base_rates"]["30%"]["corrupted"], rate) and 0.2 < rate < 0.4
    for budget in BUDGETS:
        for cell in result["cells"]["base"]["0%"][budget].values():
            assert cell["kept_corrupted_share"]["value"] == 0.0


def test_model_checksum_versions_and_figure(quick_run):
    result, out, model = quick_run
    digest = hashlib.sha256((model / "model.safetensors").read_bytes()).hexdigest()
    assert result["model"]["sha256"] == digest
    for key in ("versions", "seeds", "settings", "wall_s", "tables"):
        assert result[key], key
    assert (out / "selection_quick.png").stat().st_size > 10_000


def test_scored_problems_are_fresh():
    """No replayed or SFT problem is a problem of the real-model track, and the two sets share none."""
    sys.path.insert(0, str(RUN.parent))
    import real
    import selection

    items, sft = selection.fresh_problems(512, 192)
    track = {p.key for seed in range(real.SEEDS) for split in real.splits(96, real.N_TEST, seed) for p in split}
    keys, sft_keys = {p.key for p in items}, {p.key for p in sft}
    assert len(keys) == 512 and len(sft_keys) == 192
    assert not keys & track and not sft_keys & track and not keys & sft_keys

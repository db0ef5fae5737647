"""Which samples and tokens does Q-Tuning keep? The selection replayed offline on SmolLM2-135M-Instruct.

    python benchmarks/quality/selection.py           # 512 items, 10,000 groups per size (README.md gives its time)
    python benchmarks/quality/selection.py --quick   # 32 items, 200 groups of 8 and 16, base model only: the smoke test

No arm is trained. Generated word problems (`mathdata`), 30% of whose responses are corrupted in
the four kinds (and the same problems with every response clean), are scored once per sample by
the plugin's scoring forward (`QTuningEngine.score`: per-token NLL and entropy over the response
tokens, then `sample_stats`), by two checkpoints:

* ``base``: SmolLM2-135M-Instruct as shipped;
* ``sft``: the same model after ``SFT_STEPS`` steps of full-data SFT (`real.train_arm`'s "full" arm:
  the real-model track's settings) on other problems of the same generator, 30% corrupted.

The triage that the trainer runs (`triage_with_config`, the configured bisection and fill-up) is
then replayed on ``GROUPS`` seeded groups of each size in `GROUP_SIZES`, drawn without replacement
from the scored samples, at each budget of `BUDGETS`; the token pruning of the kept Q2 samples
(`prune_tokens`, row by row as in training) with the paper's score, the reversed score and
random tokens. Per group size, budget and checkpoint: the corrupted share of the kept samples
(overall and per kind) against the base rate, the share of kept samples the fill-up added, the
share of bisection runs that ended at the iteration cap with the tolerance unmet, how often and by
how much a group keeps more than its budget ``round(sample_keep_ratio x group)``, and the share of
the corrupted answer tokens of kept Q2 samples that survive token pruning; bootstrap 95% CIs over
groups. The whole set triaged as one batch is a reference row.

Triage windows (``triage_window``, docs/algorithm.md section 4a): on ``CHAINS`` seeded runs of
steps, each step a group of `WINDOW_SIZES` samples read in epoch order (seeded permutations of the
scored items, one after the other), the trainer's windowed triage (`TriageWindow`, then
`triage_with_config`) at each arm of `WINDOW_ARMS`; the same steps for every arm, the first
``max window - 1`` of each run not counted (they fill the window). Bootstrap CIs over runs.

The scores (both checkpoints, and the SFT checkpoint's grade) are cached in ``--cache-dir``,
keyed by the model's checksum, the versions, the settings and the source of the scoring code:
a second run only replays.

The problems are fresh: none is a problem of the real-model track (`real.splits` at its settings:
test, validation and training problems of every seed), and the scored and SFT problems share none.

The last printed line is one JSON object: the headline numbers and the wall time.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import logging
import os
import pathlib
import random
import sys
import time
import warnings

import numpy as np
import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE)]
import mathdata  # noqa: E402
import real  # noqa: E402

N_ITEMS = 512
NOISE = 0.3
GROUP_SIZES = (8, 16, 32, 64, 128)
GROUPS = 10_000
# name: (sample_keep_ratio, token_keep_ratio); the other settings are QTuningConfig's defaults.
BUDGETS = {"25x50": (0.25, 0.5), "12.5x50": (0.125, 0.5), "25x70": (0.25, 0.7)}
BOOTSTRAP = 1000
SFT_STEPS = 24  # one epoch of 192 problems at the real track's step shape (8 samples) and learning rate
SEEDS = {"items": 29_000, "corruption": 29_001, "sft_items": 29_002, "sft_corruption": 29_003,
         "sft_order": 29_004, "groups": 29_005, "random_tokens": 29_006, "bootstrap": 29_007,
         "window_steps": 29_008, "window_bootstrap": 29_009}
WINDOW_SIZES = (8, 16, 32)
# arm: (triage_window, hold_budget), as the trainer takes them; "1" is the paper's rule.
WINDOW_ARMS = {"1": (1, None), "1 held": (1, True), "4": (4, None), "16": (16, None)}
CHAINS, CHAIN_STEPS = 100, 100  # runs of steps, and the steps of each counted
SCORE_BATCH = 16
KINDS = mathdata.CORRUPTIONS
TOKEN_RULES = ("paper", "reversed", "random")


# ----------------------------------------------------------------------------- data
def fresh_problems(n_items: int, n_sft: int) -> tuple[list, list]:
    """``n_items`` problems to score and ``n_sft`` to fine-tune on, disjoint from each other and
    from every problem of the real-model track."""
    used: set = set()
    for seed in range(real.SEEDS):
        for split in real.splits(real.STEPS * real.STEP_SAMPLES, real.N_TEST, seed):
            used |= {p.key for p in split}
    items = mathdata.draw_problems(random.Random(SEEDS["items"]), n_items, used)
    sft = mathdata.draw_problems(random.Random(SEEDS["sft_items"]), n_sft, used)
    return items, sft


def scored_examples(problems: list) -> tuple[list, dict[str, list[int]]]:
    """The distinct examples to score (every problem's clean solution, then the corrupted
    responses) and, per noise level, the example index of each item."""
    noisy = mathdata.make_sft_set(problems, NOISE, random.Random(SEEDS["corruption"]))
    examples = [mathdata.Example(p, p.solution()) for p in problems]
    items = {"0%": list(range(len(problems))), "30%": []}
    for i, example in enumerate(noisy):
        if example.kind == "clean":
            items["30%"].append(i)
        else:
            items["30%"].append(len(examples))
            examples.append(example)
    return examples, items


# ----------------------------------------------------------------------------- scoring
def pad(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(r["input_ids"]) for r in rows)
    batch = {"input_ids": torch.full((len(rows), width), pad_id), "labels": torch.full((len(rows), width), -100),
             "attention_mask": torch.zeros((len(rows), width), dtype=torch.long)}
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        batch["input_ids"][b, :n] = torch.tensor(r["input_ids"])
        batch["labels"][b, :n] = torch.tensor(r["labels"])
        batch["attention_mask"][b, :n] = 1
    return batch


@torch.no_grad()
def score(model, tokenizer, examples: list) -> dict:
    """Per example: the NLL of each trainable (response) token in nats, which of them are
    corrupted (`real.encode`'s ``bad_targets``), and the sample's PPL and Ent (`sample_stats`)."""
    from qtuning_plugin import QTuningConfig
    from qtuning_plugin.core import sample_stats
    from qtuning_plugin.engine import MicroBatch, QTuningEngine

    model.eval()
    engine = QTuningEngine(QTuningConfig(backend="torch"), data_parallel=False)
    out = {"nll": [], "bad": [], "ppl": [], "ent": []}
    for start in range(0, len(examples), SCORE_BATCH):
        rows = [real.encode(tokenizer, e) for e in examples[start:start + SCORE_BATCH]]
        batch = MicroBatch.prepare(pad(rows, tokenizer.pad_token_id))
        nll, entropy = engine.score(model, batch)
        ppl, ent = sample_stats(nll, entropy, batch.mask)
        for b, r in enumerate(rows):
            positions = batch.mask[b].nonzero().squeeze(1).tolist()
            bad = set(r["bad_targets"])
            out["nll"].append(nll[b, positions].double().tolist())
            out["bad"].append([t in bad for t in positions])
        out["ppl"] += ppl.tolist()
        out["ent"] += ent.tolist()
    return out


def sft_checkpoint(model_dir: str, tokenizer, problems: list, steps: int, test: list):
    """The model after ``steps`` optimizer steps of the real-model track's full-data SFT on
    ``problems`` (30% corrupted), and its held-out exact match and loss on ``test``."""
    examples = mathdata.make_sft_set(problems, NOISE, random.Random(SEEDS["sft_corruption"]))
    dataset = real.SFTSet(tokenizer, examples)
    order = real.data_order(len(dataset), SEEDS["sft_order"], steps)
    marks = [real.Mark(steps, "final", lambda model: real.graded(model, tokenizer, test))]
    res = real.train_arm("full", model_dir, tokenizer, dataset, order, SEEDS["sft_order"], marks, "step")
    point = res["points"]["final"]
    return res["model"], {"steps": point["step"], "test_exact_match": point["acc"], "test_loss": point["loss"],
                          "test_problems": len(test), "train_cpu_s": round(res["train_cpu_s"], 1)}


# ----------------------------------------------------------------------------- token pruning
def token_tables(scores: dict, token_ratios: set[float]) -> dict:
    """Per sample and token keep ratio: corrupted tokens kept by `prune_tokens` with the paper's
    score and the reversed one (as if the sample were in Q2), and the tokens a Q2 sample keeps."""
    from qtuning_plugin.core import prune_tokens

    n, width = len(scores["nll"]), max(len(x) for x in scores["nll"])
    nll = torch.zeros((n, width), dtype=torch.float64)
    mask = torch.zeros((n, width), dtype=torch.bool)
    bad = torch.zeros((n, width), dtype=torch.bool)
    for i, (values, flags) in enumerate(zip(scores["nll"], scores["bad"])):
        nll[i, :len(values)] = torch.tensor(values, dtype=torch.float64)
        mask[i, :len(values)] = True
        bad[i, :len(flags)] = torch.tensor(flags, dtype=torch.bool)
    every = torch.ones(n, dtype=torch.bool)
    out = {"length": mask.sum(1).numpy(), "bad": bad.sum(1).numpy()}
    for r in token_ratios:
        paper = prune_tokens(nll, mask, every, r, prune_highest=True)
        reverse = prune_tokens(nll, mask, every, r, prune_highest=False)
        out[r] = {"kept": paper.sum(1).numpy(), "paper": (paper & bad).sum(1).numpy(),
                  "reversed": (reverse & bad).sum(1).numpy()}
    return out


# ----------------------------------------------------------------------------- replay
# Per-group counts. Token counts: over kept Q2 samples (``q2_``), and over the wrong_number ones among
# them (``wn_``), the one kind whose corrupted tokens are part of the response, not all of it.
COLUMNS = ("groups", "kept", "target", "kept_at_target", "over_target", "filled", "cap", "at_max_iters", "corrupted",
           *(f"kind_{k}" for k in KINDS), "q2", "q2_bad_tokens", *(f"q2_bad_left_{t}" for t in TOKEN_RULES),
           "wn_bad_tokens", *(f"wn_bad_left_{t}" for t in TOKEN_RULES))


def replay_groups(ppl: torch.Tensor, ent: torch.Tensor, kinds: np.ndarray, tokens: dict, groups: np.ndarray,
                  sample_ratio: float, token_ratios: list[float], rng: np.random.Generator) -> dict[float, np.ndarray]:
    """The trainer's triage of each group (rows of item indices), and its Q2 token pruning.

    Returns per token keep ratio a ``[groups, len(COLUMNS)]`` array of per-group counts.
    """
    from qtuning_plugin import QTuningConfig
    from qtuning_plugin.core.select import triage_with_config

    config = QTuningConfig(sample_keep_ratio=sample_ratio)
    g = groups.shape[1]
    valid = torch.ones(g, dtype=torch.bool)
    corrupted = kinds != "clean"
    out = {r: np.zeros((len(groups), len(COLUMNS))) for r in token_ratios}
    for row, members in enumerate(groups):
        triage = triage_with_config(ppl[members], ent[members], valid, config)
        keep, q2, filled = triage.keep.numpy(), triage.q2.numpy(), triage.filled.numpy()
        kept, n_filled = int(keep.sum()), int(filled.sum())
        reached = abs((kept - n_filled) / g - sample_ratio) < config.bisect_tolerance
        at_cap = triage.iterations == config.max_bisect_iters
        k_items, q2_items = members[keep], members[q2]
        wn = kinds[q2_items] == "wrong_number"
        counts = [1, kept, triage.target, kept == triage.target, kept > triage.target, n_filled, at_cap and not reached,
                  at_cap, corrupted[k_items].sum(),
                  *((kinds[k_items] == k).sum() for k in KINDS), len(q2_items)]
        bad, length = tokens["bad"][q2_items], tokens["length"][q2_items]
        for r in token_ratios:
            left = {"paper": tokens[r]["paper"][q2_items], "reversed": tokens[r]["reversed"][q2_items],
                    "random": rng.hypergeometric(bad, length - bad, tokens[r]["kept"][q2_items])}
            out[r][row] = counts + [bad.sum(), *(left[t].sum() for t in TOKEN_RULES),
                                    bad[wn].sum(), *(left[t][wn].sum() for t in TOKEN_RULES)]
    return out


def ratios(sums: np.ndarray) -> dict[str, np.ndarray]:
    """The reported shares from column sums (``sums``: ``[..., len(COLUMNS)]``)."""
    c = {name: sums[..., i] for i, name in enumerate(COLUMNS)}
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {"kept_corrupted_share": c["corrupted"] / c["kept"],
               **{f"kept_share_{k}": c[f"kind_{k}"] / c["kept"] for k in KINDS},
               "fill_up_share": c["filled"] / c["kept"],
               "cap_share": c["cap"] / c["groups"],
               "at_max_iters_share": c["at_max_iters"] / c["groups"],
               "kept_at_target_share": c["kept_at_target"] / c["groups"],
               "over_target_share": c["over_target"] / c["groups"],
               "kept_over_target": c["kept"] / c["target"],
               "kept_per_group": c["kept"] / c["groups"],
               **{f"bad_tokens_left_{t}": c[f"q2_bad_left_{t}"] / c["q2_bad_tokens"] for t in TOKEN_RULES},
               **{f"wrong_number_tokens_left_{t}": c[f"wn_bad_left_{t}"] / c["wn_bad_tokens"] for t in TOKEN_RULES}}
    return out


def summarise(per_group: np.ndarray, weights: np.ndarray) -> dict:
    """Each share over all groups with its bootstrap 95% CI (``weights``: ``[B, groups]`` resampling counts)."""
    point = ratios(per_group.sum(0))
    boot = ratios(weights @ per_group)
    return {name: {"value": float(value), "ci": [float(x) for x in np.nanpercentile(boot[name], [2.5, 97.5])]}
            if np.isfinite(value) else {"value": None, "ci": None} for name, value in point.items()}


def whole_set(ppl, ent, kinds, tokens, sample_ratio, token_ratios, rng) -> dict[float, dict]:
    per = replay_groups(ppl, ent, kinds, tokens, np.arange(len(kinds))[None, :], sample_ratio, token_ratios, rng)
    return {r: {k: (float(v) if np.isfinite(v) else None) for k, v in ratios(rows.sum(0)).items()}
            for r, rows in per.items()}


# ----------------------------------------------------------------------------- triage windows
WINDOW_COLUMNS = ("steps", "kept", "target", "corrupted", "filled", "trimmed")


def window_chains(n_items: int, size: int, n_chains: int, steps: int, rng: np.random.Generator) -> np.ndarray:
    """``[n_chains, steps, size]`` item indices: each run reads seeded permutations of the items one
    after the other (epochs), ``size`` samples a step."""
    need = steps * size
    epochs = -(-need // n_items)
    return np.stack([np.concatenate([rng.permutation(n_items) for _ in range(epochs)])[:need].reshape(steps, size)
                     for _ in range(n_chains)])


def replay_window(ppl: torch.Tensor, ent: torch.Tensor, kinds: np.ndarray, chains: np.ndarray, sample_ratio: float,
                  window: int, hold_budget, warm: int) -> np.ndarray:
    """The trainer's windowed triage (`TriageWindow` pooled into `triage_with_config`, then the step
    pushed) along each run of ``chains``; per run a ``[len(WINDOW_COLUMNS)]`` row of counts summed over
    its steps after the first ``warm``."""
    from qtuning_plugin import QTuningConfig
    from qtuning_plugin.core.select import triage_with_config
    from qtuning_plugin.core.window import TriageWindow

    config = QTuningConfig(sample_keep_ratio=sample_ratio, triage_window=window, hold_budget=hold_budget)
    valid = torch.ones(chains.shape[2], dtype=torch.bool)
    corrupted = kinds != "clean"
    out = np.zeros((len(chains), len(WINDOW_COLUMNS)))
    for run, steps in enumerate(chains):
        memory = TriageWindow(window)
        for index, members in enumerate(steps):
            step_ppl, step_ent = ppl[members], ent[members]
            triage = triage_with_config(step_ppl, step_ent, valid, config, memory.earlier())
            memory.push(torch.stack([step_ppl, step_ent, valid.to(torch.float64)], dim=1))
            if index < warm:
                continue
            keep = triage.keep.numpy()
            out[run] += [1, keep.sum(), triage.target, corrupted[members[keep]].sum(), triage.filled.sum().item(),
                         triage.trimmed.sum().item()]
    return out


def window_ratios(sums: np.ndarray) -> dict[str, np.ndarray]:
    c = {name: sums[..., i] for i, name in enumerate(WINDOW_COLUMNS)}
    return {"kept_corrupted_share": c["corrupted"] / c["kept"], "fill_up_share": c["filled"] / c["kept"],
            "kept_over_target": c["kept"] / c["target"], "trimmed_per_step": c["trimmed"] / c["steps"]}


def summarise_window(per_run: np.ndarray, weights: np.ndarray) -> dict:
    """Each window share over all runs with its bootstrap 95% CI (``weights``: ``[B, runs]``)."""
    point, boot = window_ratios(per_run.sum(0)), window_ratios(weights @ per_run)
    return {name: {"value": float(value), "ci": [float(x) for x in np.percentile(boot[name], [2.5, 97.5])]}
            for name, value in point.items()}


# ----------------------------------------------------------------------------- score cache
def cache_key(weights_sha: str, n_items: int, sft_steps: int, n_test: int) -> str:
    """What the scores depend on: the model, the versions, the settings and the data and scoring code."""
    code = "".join(inspect.getsource(f) for f in (fresh_problems, scored_examples, score, sft_checkpoint, pad))
    plugin = pathlib.Path(__file__).resolve().parents[2] / "qtuning_plugin"
    sources = [(HERE / name).read_bytes() for name in ("mathdata.py", "real.py")] + [
        (plugin / name).read_bytes() for name in ("ops/torch_chunked.py", "modeling.py", "core/eu_plane.py")]
    blob = json.dumps([weights_sha, real.versions(), n_items, sft_steps, n_test, NOISE, SEEDS, SCORE_BATCH, code])
    digest = hashlib.sha256(blob.encode())
    for source in sources:
        digest.update(source)
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------- report
def share(m: dict) -> str:
    """A share and its CI in %, "-" where undefined."""
    if m["value"] is None:
        return "-"
    return f"{100 * m['value']:.1f}" + (f" [{100 * m['ci'][0]:.1f}, {100 * m['ci'][1]:.1f}]" if m["ci"] else "")


def table(cells: dict, budget: str, sizes, checkpoints) -> str:
    f = share
    lines = ["| checkpoint | group | kept corrupted % [95% CI] | fill-up % of kept | bisection at cap, tolerance unmet % | "
             "corrupted tokens left in kept Q2 samples, paper / reversed / random %: all kinds | wrong_number only |",
             "|" + "---|" * 7]
    for ckpt in checkpoints:
        for g in [*sizes, "all"]:
            c = cells[ckpt]["30%"][budget][str(g)]
            tokens = " / ".join(f(c[f"bad_tokens_left_{t}"]) for t in TOKEN_RULES)
            wrong = " / ".join(f(c[f"wrong_number_tokens_left_{t}"]) for t in TOKEN_RULES)
            lines.append(f"| {ckpt} | {g} | {f(c['kept_corrupted_share'])} | {f(c['fill_up_share'])} | "
                         f"{f(c['cap_share'])} | {tokens} | {wrong} |")
    return "\n".join(lines)


def kind_table(cells: dict, budget: str, sizes, checkpoints, base_rates: dict) -> str:
    lines = ["| checkpoint | group | " + " | ".join(f"{k} % of kept (base {100 * base_rates[k]:.1f})" for k in KINDS) + " |",
             "|" + "---|" * (2 + len(KINDS))]
    for ckpt in checkpoints:
        for g in [*sizes, "all"]:
            c = cells[ckpt]["30%"][budget][str(g)]
            lines.append(f"| {ckpt} | {g} | " + " | ".join(share(c[f"kept_share_{k}"]) for k in KINDS) + " |")
    return "\n".join(lines)


def budget_table(cells: dict, sizes, checkpoints) -> str:
    """How often and by how much the paper's rule keeps more than K = round(r x group), and what that
    costs by the step-cost model of docs/algorithm.md section 7, (1 + 3 r') / (1 + 3 r)."""
    lines = ["| checkpoint | budget | group | groups keeping more than K % [95% CI] | kept / K [95% CI] | "
             "step cost over K's |", "|" + "---|" * 6]
    for ckpt in checkpoints:
        for budget in ("25x50", "12.5x50"):
            r = BUDGETS[budget][0]
            for g in sizes:
                c = cells[ckpt]["30%"][budget][str(g)]
                over, ratio = c["over_target_share"], c["kept_over_target"]
                cost = (1 + 3 * r * ratio["value"]) / (1 + 3 * r)
                lines.append(f"| {ckpt} | {budget} | {g} | {share(over)} | {ratio['value']:.4f} "
                             f"[{ratio['ci'][0]:.4f}, {ratio['ci'][1]:.4f}] | {cost:.4f} |")
    return "\n".join(lines)


def window_table(windows: dict, cells: dict, budget: str, checkpoints, metric: str) -> str:
    """Per checkpoint and step size, ``metric`` of each `WINDOW_ARMS` arm, and the whole set at once."""
    lines = ["| checkpoint | step samples | " + " | ".join(f"window {arm}" for arm in WINDOW_ARMS)
             + " | whole set at once |", "|" + "---|" * (3 + len(WINDOW_ARMS))]
    for ckpt in checkpoints:
        for g, arms in windows[ckpt][budget].items():
            whole = cells[ckpt]["30%"][budget]["all"].get(metric, {"value": None, "ci": None})
            lines.append(f"| {ckpt} | {g} | " + " | ".join(share(arms[arm][metric]) for arm in WINDOW_ARMS)
                         + f" | {share(whole)} |")
    return "\n".join(lines)


def sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="SmolLM2-135M-Instruct as a model folder (default: qtuning_plugin.smollm2's cached one)")
    parser.add_argument("--quick", action="store_true",
                        help="32 items, 200 groups of 8 and 16, no SFT checkpoint, 200 bootstrap draws: the smoke test")
    parser.add_argument("--out", default=str(HERE))
    parser.add_argument("--dump-groups", type=int, default=0,
                        help="write the first N groups of each size (items, kept, filled) with the scores, for checking")
    parser.add_argument("--cache-dir", default=os.environ.get("QTUNING_QUALITY_CACHE", str(pathlib.Path.home() / ".cache/qtuning/quality")),
                        help="where the scores are cached (default: $QTUNING_QUALITY_CACHE, else ~/.cache/qtuning/quality)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.getLogger("qtuning_plugin").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    import figures

    n_items, n_groups, sizes, sft_steps, n_boot, n_test = (
        (32, 200, (8, 16), 0, 200, 0) if args.quick else (N_ITEMS, GROUPS, GROUP_SIZES, SFT_STEPS, BOOTSTRAP, 32))
    window_sizes, n_chains, chain_steps = ((8, 16), 8, 10) if args.quick else (WINDOW_SIZES, CHAINS, CHAIN_STEPS)
    suffix = "_quick" if args.quick else ""
    phases: dict[str, float] = {}
    t0 = last = time.time()

    def phase(name: str) -> None:
        nonlocal last
        phases[name] = round(time.time() - last, 1)
        last = time.time()
        print(f"[{time.time() - t0:6.0f}s] {name} done ({phases[name]} s)", flush=True)

    if args.model is None:
        from qtuning_plugin.smollm2 import ensure_model

        args.model = str(ensure_model())
    weights_sha = sha256(pathlib.Path(args.model) / "model.safetensors")
    problems, sft_problems = fresh_problems(n_items, sft_steps * real.STEP_SAMPLES)
    test = real.splits(8, n_test, 0)[0]  # the real track's held-out problems, for the checkpoint's grade
    examples, item_index = scored_examples(problems)
    cache = pathlib.Path(args.cache_dir) / f"selection-scores-{cache_key(weights_sha, n_items, sft_steps, n_test)}.json"
    phase("data")
    if cache.is_file():
        cached = json.loads(cache.read_text())
        scores, sft_info = cached["scores"], cached["sft"]
        print(f"scores from {cache}", flush=True)
        phase("scores_from_cache")
    else:
        model, tokenizer = real.load_model(args.model, lora=False)
        scores = {"base": score(model, tokenizer, examples)}
        phase("score_base")
        sft_info = None
        if sft_steps:
            model, sft_info = sft_checkpoint(args.model, tokenizer, sft_problems, sft_steps, test)
            phase("sft")
            scores["sft"] = score(model, tokenizer, examples)
            phase("score_sft")
        del model
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"scores": scores, "sft": sft_info}))

    token_ratios = sorted({r for _, r in BUDGETS.values()})
    example_kinds = np.array([e.kind for e in examples])
    group_rng = np.random.default_rng(SEEDS["groups"])
    groups = {g: np.stack([group_rng.choice(n_items, g, replace=False) for _ in range(n_groups)]) for g in sizes}
    boot_rng = np.random.default_rng(SEEDS["bootstrap"])
    weights = boot_rng.multinomial(n_groups, np.full(n_groups, 1 / n_groups), size=n_boot).astype(np.float64)
    cells: dict = {}
    dumps: dict = {}
    base_rates = {}
    for ckpt, sc in scores.items():
        tokens = token_tables(sc, set(token_ratios))
        for level, index in item_index.items():
            index = np.array(index)
            kinds = example_kinds[index]
            base_rates[level] = {"corrupted": float((kinds != "clean").mean()), **{k: float((kinds == k).mean()) for k in KINDS}}
            ppl = torch.tensor(sc["ppl"], dtype=torch.float64)[index]
            ent = torch.tensor(sc["ent"], dtype=torch.float64)[index]
            level_tokens = {"length": tokens["length"][index], "bad": tokens["bad"][index],
                            **{r: {k: v[index] for k, v in tokens[r].items()} for r in token_ratios}}
            rng = np.random.default_rng(SEEDS["random_tokens"])
            for sample_ratio in sorted({s for s, _ in BUDGETS.values()}):
                mine = [r for name, (s, r) in BUDGETS.items() if s == sample_ratio]
                for g in sizes:
                    per = replay_groups(ppl, ent, kinds, level_tokens, groups[g], sample_ratio, mine, rng)
                    for name, (s, r) in BUDGETS.items():
                        if s == sample_ratio:
                            cell = cells.setdefault(ckpt, {}).setdefault(level, {}).setdefault(name, {})
                            cell[str(g)] = summarise(per[r], weights)
                whole = whole_set(ppl, ent, kinds, level_tokens, sample_ratio, mine, rng)
                for name, (s, r) in BUDGETS.items():
                    if s == sample_ratio:
                        cells[ckpt][level][name]["all"] = {k: {"value": v, "ci": None} for k, v in whole[r].items()}
            if args.dump_groups:
                dumps.setdefault(ckpt, {})[level] = {
                    "ppl": ppl.tolist(), "ent": ent.tolist(), "kinds": kinds.tolist(),
                    "nll": [sc["nll"][i] for i in index], "bad": [sc["bad"][i] for i in index],
                    "groups": {str(g): groups[g][:args.dump_groups].tolist() for g in sizes}}
        phase(f"replay_{ckpt}")

    # Triage windows, 30% corrupted: the same runs of steps for every checkpoint, budget and arm.
    warm = max(window for window, _ in WINDOW_ARMS.values()) - 1
    chain_rng = np.random.default_rng(SEEDS["window_steps"])
    chains = {g: window_chains(n_items, g, n_chains, warm + chain_steps, chain_rng) for g in window_sizes}
    chain_weights = np.random.default_rng(SEEDS["window_bootstrap"]).multinomial(
        n_chains, np.full(n_chains, 1 / n_chains), size=n_boot).astype(np.float64)
    windows: dict = {}
    index = np.array(item_index["30%"])
    for ckpt, sc in scores.items():
        ppl = torch.tensor(sc["ppl"], dtype=torch.float64)[index]
        ent = torch.tensor(sc["ent"], dtype=torch.float64)[index]
        for budget in ("25x50", "12.5x50"):
            for g in window_sizes:
                windows.setdefault(ckpt, {}).setdefault(budget, {})[str(g)] = {
                    arm: summarise_window(replay_window(ppl, ent, example_kinds[index], chains[g], BUDGETS[budget][0],
                                                        window, hold, warm), chain_weights)
                    for arm, (window, hold) in WINDOW_ARMS.items()}
        if args.dump_groups:
            dumps[ckpt]["30%"]["chains"] = {str(g): chains[g].tolist() for g in window_sizes}
            dumps[ckpt]["30%"]["uncounted_first_steps"] = warm
        phase(f"windows_{ckpt}")

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    figures.plot_selection(cells, sizes, base_rates["30%"]["corrupted"], n_items,
                           out / f"selection{suffix}.png", windows)
    checkpoints = list(scores)
    tables = {f"{budget}": table(cells, budget, sizes, checkpoints) for budget in BUDGETS}
    tables["kinds_25x50"] = kind_table(cells, "25x50", sizes, checkpoints, base_rates["30%"])
    tables["budget"] = budget_table(cells, sizes, checkpoints)
    for budget in ("25x50", "12.5x50"):
        tables[f"windows_{budget}"] = window_table(windows, cells, budget, checkpoints, "kept_corrupted_share")
        tables[f"windows_fill_up_{budget}"] = window_table(windows, cells, budget, checkpoints, "fill_up_share")
    phase("report")
    headline = {ckpt: {str(g): cells[ckpt]["30%"]["25x50"][str(g)]["kept_corrupted_share"] for g in [*sizes, "all"]}
                for ckpt in checkpoints}
    total = round(time.time() - t0, 1)
    window_headline = {ckpt: {g: {arm: cell["kept_corrupted_share"] for arm, cell in arms.items()}
                              for g, arms in windows[ckpt]["25x50"].items()} for ckpt in checkpoints}
    result = {"unit": "share of kept samples that are corrupted, 25% x 50%", "base_rate": base_rates["30%"]["corrupted"],
              "kept_corrupted_share": headline, "window_kept_corrupted_share": window_headline, "quick": args.quick,
              "total_wall_s": total}
    (out / f"results_selection{suffix}.json").write_text(json.dumps({
        **result,
        "model": {"name": "SmolLM2-135M-Instruct", "weights_file": "model.safetensors", "sha256": weights_sha},
        "versions": real.versions(), "seeds": SEEDS,
        "settings": {"items": n_items, "noise": NOISE, "noise_levels": list(item_index), "group_sizes": list(sizes),
                     "groups_per_size": n_groups, "budgets": BUDGETS, "bootstrap_draws": n_boot,
                     "triage": "QTuningConfig defaults: max_bisect_iters 10, bisect_tolerance 0.01, context_weight 0.5",
                     "groups": "drawn without replacement within a group, the same groups for every budget and checkpoint",
                     "windows": {"arms": {arm: {"triage_window": w, "hold_budget": h} for arm, (w, h) in WINDOW_ARMS.items()},
                                 "step_sizes": list(window_sizes), "runs": n_chains, "counted_steps_per_run": chain_steps,
                                 "uncounted_first_steps": warm, "noise": NOISE,
                                 "steps": "each run reads seeded permutations of the items one after the other, "
                                          "the same runs for every arm, budget and checkpoint; bootstrap over runs"},
                     "score_cache": cache.name,
                     "sft": {"steps": sft_steps, "problems": len(sft_problems), "noise": NOISE, "lr": real.LR[real.FINETUNE],
                             "finetune": real.FINETUNE, "micro_batch": real.MICRO_BATCH, "grad_accum": real.GRAD_ACCUM,
                             "warmup_steps": real.WARMUP_STEPS, **(sft_info or {})},
                     "corrupted_tokens": "mathdata's bad_spans: the wrong numbers of a wrong_number response; the "
                                         "whole response and <|im_end|> of the other kinds"},
        "base_rates": base_rates, "wall_s": phases, "cells": cells, "windows": windows, "tables": tables,
        **({"dump": dumps} if dumps else {})}, indent=1))
    for title, text in tables.items():
        print(f"\n{title}\n{text}")
    print(f"\ntotal wall time {total:.1f} s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""When does Q-Tuning pay off? A controlled miniature with known ground truth (issues 7 and 16).

    python benchmarks/quality/run.py            # everything below, about 30 min on a shared 2-core machine
    python benchmarks/quality/run.py --quick    # the same structure, 1 seed, 40 steps (a few minutes)

Task: 3-digit addition, written plainly ("<s>123+456=" -> "0579</s>"), character
tokens (vocabulary 16), a 3-layer Llama (hidden 128) built in-process.

1. Pre-training: plain causal-LM training (prompt masked) on random problems
   until exact match on a *validation* split first reaches 35% (checked every
   10 steps from step 600, at most 2500 steps). Cached under
   ``$QTUNING_QUALITY_CACHE`` (default ``~/.cache/qtuning/quality``), keyed by
   the settings.
2. SFT set, per seed and condition (1600 items, fixed length 14 tokens, 5
   trainable each), for a noise kind and level:
   * level x 100% corrupted: a fresh problem whose answer has 1 or 2 digits
     replaced by another digit (kind "digits") or is redrawn whole (kind
     "answer"); the positions are recorded;
   * the clean rest, 3 : 4, redundant : fresh (30% / 40% at level 0.3):
     redundant items are near-duplicates (a+b or b+a, repeated) of 80 problems
     the pre-trained model already solves in both orders; fresh items are new
     problems with correct answers.
3. Arms (`ARMS`): full fine-tuning of the whole model, the same learning-rate
   schedule, seed and data order; they differ only in what the loss sees:
   * full            -- every sample and token (QTuningTrainerMixin with enabled=False:
                        the model's own loss);
   * random_25       -- a random 25% of each micro-batch, all tokens (no scoring pass);
   * qtuning_25x70   -- Q-Tuning, 25% samples x 70% tokens of Q2 samples;
   * qtuning_12.5x50 -- Q-Tuning, 12.5% x 50%;
   * reversed_25x70  -- 25% x 70% with prune_highest_scores=False (paper's ablation);
   * triage_only_25  -- 25% samples, token_keep_ratio=1.0;
   and two diagnostics that use the ground truth (not methods): oracle_clean
   (drop exactly the corrupted samples: the ceiling of any noise filter) and
   oracle_25 (25% of each micro-batch, fresh items first, never a corrupted one
   while a clean one is left).
4. Questions, each a set of runs:
   * equal steps: every arm for 150 optimizer steps of micro-batch 32 (3 epochs);
   * equal training time: each pruned arm for as many steps as full-data SFT's
     150 cost at the arm's own median step time, both measured in the same run
     (same seed, same condition) as CPU time of the one-thread process, which
     the other processes of a shared machine disturb far less than wall time;
     held-out exact match is evaluated at 5 points of every such run, for the
     accuracy-vs-cost curves;
   * noise level: every arm at 0%, 30%, 50% and 70% corrupted answers, both kinds
     (equal steps);
   * triage batch size: Q-Tuning 25% x 70% triaging the whole optimizer step
     (the plugin's `triage_scope: step`) at micro-batch 32 x accumulation 1, 4 x 8 and
     1 x 32: the selections are compared step by step.
5. Held-out: 1000 clean problems, used only to report exact match (final and
   along the curves). Validation (500 clean problems) is used only to stop
   pre-training. Neither set overlaps any training problem. No setting is
   chosen by looking at the held-out split.

The last printed line is one JSON object (accuracies in % held-out exact match).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import os
import pathlib
import random
import statistics
import sys
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass, field

import torch

HERE = pathlib.Path(__file__).resolve().parent

# ----------------------------------------------------------------------------- task
DIGITS = 3
CHARS = "0123456789+="
BOS, EOS, PAD = 0, 1, 2
STOI = {c: i + 3 for i, c in enumerate(CHARS)}
VOCAB = 16
PROMPT_LEN = 1 + 2 * DIGITS + 2  # <s> aaa + bbb =
ANSWER_DIGITS = DIGITS + 1
SEQ_LEN = PROMPT_LEN + ANSWER_DIGITS + 1  # ... dddd </s>

PRETRAIN = dict(hidden=128, layers=3, heads=4, batch=64, lr=1e-3, warmup=100, target=0.35,
                check_from=600, check_every=10, max_steps=2500, seed=0, version=1)
SFT = dict(n_items=1600, redundant_share_of_clean=3 / 7, pool=80, batch=32, epochs=3,
           lr=5e-4, warmup_ratio=0.05)
N_TEST, N_VAL = 1000, 500
NOISE_LEVELS = (0.0, 0.3, 0.5, 0.7)
MAIN_LEVEL = 0.3  # the level of the equal-compute comparison and of the per-arm analysis
CURVE_POINTS = 5  # held-out evaluations along each equal-compute run


@dataclass(frozen=True)
class Arm:
    """One way to train: what the loss sees, and the shape of the optimizer step.

    kind: "full" (every sample and token), "qtuning" (the plugin, with the
    `QTuningConfig` keys in ``qtuning``), "random" (a random 25% of each
    micro-batch), or the ground-truth diagnostics "oracle_clean" / "oracle_25".
    triage_scope is the plugin's ``qtuning.triage_scope``: "step" triages micro_batch x
    grad_accum samples at once, "micro_batch" each micro-batch (the same at grad_accum 1).
    """

    kind: str
    qtuning: dict = field(default_factory=dict)
    micro_batch: int = 32
    grad_accum: int = 1
    triage_scope: str = "micro_batch"

    @property
    def diagnostic(self) -> bool:
        return self.kind.startswith("oracle")


Q25x70 = dict(sample_keep_ratio=0.25, token_keep_ratio=0.7)
ARMS = {
    "full": Arm("full"),
    "random_25": Arm("random"),
    "qtuning_25x70": Arm("qtuning", Q25x70),
    "qtuning_12.5x50": Arm("qtuning", dict(sample_keep_ratio=0.125, token_keep_ratio=0.5)),
    "reversed_25x70": Arm("qtuning", dict(Q25x70, prune_highest_scores=False)),
    "triage_only_25": Arm("qtuning", dict(sample_keep_ratio=0.25, token_keep_ratio=1.0)),
    # Diagnostics with ground-truth knowledge (not methods): how harmful is the noise here,
    # and what is the best any 25% selection could do at this number of steps?
    "oracle_clean": Arm("oracle_clean"),
    "oracle_25": Arm("oracle_25"),
}
# The triage batch size question: one optimizer step of 32 samples, in three shapes.
STEP_SCOPE_ARMS = {f"qtuning_25x70_step_{mbs}x{ga}": Arm("qtuning", Q25x70, mbs, ga, "step")
                   for mbs, ga in ((32, 1), (4, 8), (1, 32))}
TYPES = ("corrupted", "redundant", "fresh")


def encode(a: int, b: int, answer: str | None = None) -> list[int]:
    if answer is None:
        answer = str(a + b).zfill(ANSWER_DIGITS)
    return [BOS] + [STOI[c] for c in f"{a:0{DIGITS}d}+{b:0{DIGITS}d}="] + [STOI[c] for c in answer] + [EOS]


def decode(row: torch.Tensor) -> tuple[int, int]:
    """The problem (a, b) of an encoded row."""
    text = "".join(CHARS[t - 3] for t in row[1:PROMPT_LEN - 1].tolist())
    a, b = text.split("+")
    return int(a), int(b)


def key(a: int, b: int) -> int:
    return a * 10**DIGITS + b


def draw_fresh(rng: random.Random, n: int, exclude: set[int]) -> list[tuple[int, int]]:
    out = []
    while len(out) < n:
        a, b = rng.randrange(10**DIGITS), rng.randrange(10**DIGITS)
        if key(a, b) not in exclude:
            exclude.add(key(a, b))
            out.append((a, b))
    return out


def eval_splits() -> tuple[list, list, set[int]]:
    """The held-out test and the validation problems (fixed), and the set of their keys."""
    rng, used = random.Random(12345), set()
    test = draw_fresh(rng, N_TEST, used)
    val = draw_fresh(rng, N_VAL, used)
    return test, val, used


# ----------------------------------------------------------------------------- model
def build_model(settings: dict):
    from _common import build_llama

    config = dict(
        vocab_size=VOCAB, hidden_size=settings["hidden"], intermediate_size=2 * settings["hidden"],
        num_hidden_layers=settings["layers"], num_attention_heads=settings["heads"],
        num_key_value_heads=settings["heads"], max_position_embeddings=32,
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
    )
    return build_llama(config, seed=settings["seed"])


@torch.no_grad()
def greedy_correct(model, problems: list[tuple[int, int]]) -> torch.Tensor:
    """[N] bool: greedy decoding of the answer (4 digits + </s>) is exactly right.

    One teacher-forced forward: greedy decoding reproduces the answer iff the
    arg-max at every answer position, given the true prefix, is the true token
    (up to the first miss the decoded prefix is the true one). Same result as
    decoding token by token, about 5 times faster.
    """
    was_training = model.training
    model.eval()
    rows = torch.tensor([encode(a, b) for a, b in problems])
    logits = model(input_ids=rows[:, :-1], use_cache=False, logits_to_keep=SEQ_LEN - PROMPT_LEN).logits
    model.train(was_training)
    return (logits.argmax(-1) == rows[:, PROMPT_LEN:]).all(dim=1)


def batch_tensors(rows: list[list[int]]) -> dict[str, torch.Tensor]:
    ids = torch.tensor(rows)
    labels = ids.clone()
    labels[:, :PROMPT_LEN] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def pretrain(cache_dir: pathlib.Path, val, exclude: set[int], log) -> tuple[object, dict]:
    """Plain causal-LM pre-training to a middling validation accuracy; cached by settings."""
    digest = hashlib.sha256(json.dumps(PRETRAIN, sort_keys=True).encode()).hexdigest()[:12]
    path = cache_dir / f"pretrained-{digest}.pt"
    model = build_model(PRETRAIN)
    if path.exists():
        blob = torch.load(path, weights_only=False)
        model.load_state_dict(blob["state_dict"])
        log(f"pre-trained checkpoint from cache: {path} ({blob['info']})")
        return model, {**blob["info"], "cached": True}
    rng = random.Random(PRETRAIN["seed"])
    opt = torch.optim.AdamW(model.parameters(), lr=PRETRAIN["lr"], weight_decay=0.0)
    model.train()
    start, acc, step = time.time(), 0.0, 0
    for step in range(1, PRETRAIN["max_steps"] + 1):
        for group in opt.param_groups:
            group["lr"] = PRETRAIN["lr"] * min(1.0, step / PRETRAIN["warmup"])
        problems = []
        while len(problems) < PRETRAIN["batch"]:
            a, b = rng.randrange(10**DIGITS), rng.randrange(10**DIGITS)
            if key(a, b) not in exclude:
                problems.append((a, b))
        loss = model(**batch_tensors([encode(a, b) for a, b in problems])).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= PRETRAIN["check_from"] and step % PRETRAIN["check_every"] == 0:
            acc = float(greedy_correct(model, val).float().mean())
            log(f"  pretrain step {step}: loss {loss.item():.3f}, validation exact match {acc:.3f}")
            if acc >= PRETRAIN["target"]:
                break
    info = {"steps": step, "val_acc": acc, "seconds": round(time.time() - start, 1)}
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"state_dict": model.state_dict(), "info": info, "settings": PRETRAIN}, tmp)
    os.replace(tmp, path)
    log(f"pre-trained in {info['seconds']} s: {info}")
    return model, {**info, "cached": False}


# ----------------------------------------------------------------------------- SFT data
class SFTSet(torch.utils.data.Dataset):
    def __init__(self, rows, kinds, corrupt_pos):
        self.rows = torch.tensor(rows)
        self.kinds = kinds  # "corrupted" / "redundant" / "fresh"
        self.corrupt_pos = corrupt_pos  # input positions of the corrupted answer tokens

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        ids = self.rows[i]
        labels = ids.clone()
        labels[:PROMPT_LEN] = -100
        return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids),
                "idx": torch.tensor(i)}


def build_sft_set(seed: int, model, exclude: set[int], noise: str, level: float) -> SFTSet:
    """The SFT set of one seed: ``level`` x n_items corrupted by ``noise`` ("digits" or "answer"), the rest clean."""
    rng = random.Random(1000 + seed)
    used = set(exclude)
    n = SFT["n_items"]
    n_bad = round(level * n)
    n_red = round(SFT["redundant_share_of_clean"] * (n - n_bad))
    n_fresh = n - n_bad - n_red
    # Redundant: a pool of problems the pre-trained model solves in both orders.
    pool = []
    while len(pool) < SFT["pool"]:
        cands = draw_fresh(rng, 200, used)
        both = cands + [(b, a) for a, b in cands]
        ok = greedy_correct(model, both)
        pool += [c for i, c in enumerate(cands) if ok[i] and ok[i + len(cands)]]
    pool = pool[: SFT["pool"]]
    used |= {key(b, a) for a, b in pool}
    items = []
    for _ in range(n_red):
        a, b = rng.choice(pool)
        if rng.random() < 0.5:
            a, b = b, a
        items.append(("redundant", encode(a, b), []))
    for a, b in draw_fresh(rng, n_bad, used):
        answer = list(str(a + b).zfill(ANSWER_DIGITS))
        if noise == "digits":
            positions = sorted(rng.sample(range(ANSWER_DIGITS), rng.choice((1, 2))))
        else:  # "answer": a random wrong answer, every digit redrawn
            positions = list(range(ANSWER_DIGITS))
        for p in positions:
            answer[p] = rng.choice([d for d in "0123456789" if d != answer[p]])
        items.append(("corrupted", encode(a, b, "".join(answer)), [PROMPT_LEN + p for p in positions]))
    for a, b in draw_fresh(rng, n_fresh, used):
        items.append(("fresh", encode(a, b), []))
    rng.shuffle(items)
    return SFTSet([r for _, r, _ in items], [k for k, _, _ in items], [p for _, _, p in items])


# ----------------------------------------------------------------------------- training
def eval_steps(steps: int, points: int) -> set[int]:
    """The optimizer steps after which a run evaluates the held-out set: ``points`` evenly spaced, the last one included."""
    return {max(1, round(steps * k / points)) for k in range(1, points + 1)}


def run_arm(name: str, seed: int, base_state: dict, dataset: SFTSet, steps: int, out_dir: pathlib.Path, test,
            curve_points: int = 1) -> dict:
    """Train a copy of the pre-trained model as arm ``name`` for ``steps`` optimizer steps.

    Returns the held-out exact match (%) after the last step and at ``curve_points``
    evenly spaced steps (``curve``: step, tokens with gradient, accuracy), the
    median and total time of its optimizer steps, CPU and wall-clock
    (`trainers.StepClock`), and the records of what the loss kept.
    """
    from transformers import TrainingArguments

    from qtuning_plugin import QTuningConfig
    from trainers import IndexedCollator, QTuningTrainer, StepClock

    arm = ARMS.get(name) or STEP_SCOPE_ARMS[name]
    model = build_model(PRETRAIN)
    model.load_state_dict(base_state)
    args = TrainingArguments(
        output_dir=str(out_dir / f"{name}-{seed}"), per_device_train_batch_size=arm.micro_batch,
        gradient_accumulation_steps=arm.grad_accum, max_steps=steps, learning_rate=SFT["lr"], lr_scheduler_type="cosine",
        warmup_steps=max(1, round(SFT["warmup_ratio"] * steps)), weight_decay=0.0, seed=seed, data_seed=seed,
        use_cpu=True, report_to=[], save_strategy="no", logging_steps=max(1, steps // 4),
        dataloader_drop_last=True, disable_tqdm=True, remove_unused_columns=False,
    )
    if arm.kind == "full":
        collator, config = IndexedCollator(seed), QTuningConfig(enabled=False)
    elif arm.kind == "qtuning":
        collator = IndexedCollator(seed)
        config = QTuningConfig(backend="torch", triage_scope=arm.triage_scope, **arm.qtuning)
    else:  # random and the oracles: 25% of each micro-batch (oracle_clean: every clean sample), all tokens
        oracle = arm.kind if arm.diagnostic else None
        collator = IndexedCollator(seed, sample_keep_ratio=0.25, oracle=oracle, kinds=dataset.kinds)
        config = QTuningConfig(enabled=False)
    trainer = QTuningTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                             qtuning_config=config)
    clock = StepClock(eval_steps(steps, curve_points), lambda: 100 * float(greedy_correct(model, test).float().mean()),
                      lambda: trainer.tokens_with_gradient)
    trainer.add_callback(clock)
    with contextlib.redirect_stdout(io.StringIO()):  # the Trainer prints its logs
        trainer.train()
    return {"acc": clock.curve[-1]["acc"], "steps": steps, "curve": clock.curve, "tokens": trainer.tokens_with_gradient,
            "median_step_cpu_s": statistics.median(clock.step_cpu_seconds), "train_cpu_s": sum(clock.step_cpu_seconds),
            "median_step_wall_s": statistics.median(clock.step_seconds), "train_wall_s": sum(clock.step_seconds),
            "records": trainer.records,
            "final_loss": next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None)}


# ----------------------------------------------------------------------------- analysis
def noise_analysis(records, dataset: SFTSet) -> dict:
    """Where the ground-truth types land on the EU plane during training, and P/R of the drops."""
    from qtuning_plugin.core.triage import NO_TARGET, QUADRANTS

    kinds = dataset.kinds
    counts = {t: defaultdict(int) for t in TYPES}
    dropped = dropped_bad = bad_total = 0
    bad_q2 = bad_q2_all_pruned = bad_q2_any_pruned = 0
    for rec in records:
        for j, i in enumerate(rec["idx"].tolist()):
            kind = kinds[i]
            keep, q2 = bool(rec["keep"][j]), bool(rec["q2"][j])
            quadrant = int(rec["quadrant"][j])
            if quadrant == NO_TARGET:  # no answer token: it took no part in the triage
                continue
            counts[kind][QUADRANTS[quadrant]] += 1
            counts[kind]["n"] += 1
            if not keep:
                dropped += 1
                dropped_bad += kind == "corrupted"
            if kind == "corrupted":
                bad_total += 1
                if q2:
                    bad_q2 += 1
                    kept_cols = [pos - 1 for pos in dataset.corrupt_pos[i]]  # targets are shifted by one
                    pruned = [not bool(rec["token_mask"][j, c]) for c in kept_cols]
                    bad_q2_all_pruned += all(pruned)
                    bad_q2_any_pruned += any(pruned)
    quadrants = {t: {q: counts[t][q] / max(1, counts[t]["n"]) for q in QUADRANTS} for t in TYPES}
    return {
        "noise_precision": dropped_bad / max(1, dropped),
        "noise_recall": dropped_bad / max(1, bad_total),
        "corrupted_in_q2": bad_q2 / max(1, bad_total),
        "corrupted_in_q2_all_bad_tokens_pruned": bad_q2_all_pruned / max(1, bad_total),
        "q2_corrupted_all_bad_tokens_pruned": bad_q2_all_pruned / max(1, bad_q2),
        "q2_corrupted_any_bad_token_pruned": bad_q2_any_pruned / max(1, bad_q2),
        "quadrants": quadrants,
    }


def random_drop_pr(records, dataset) -> dict:
    dropped = dropped_bad = bad = 0
    for rec in records:
        for j, i in enumerate(rec["idx"].tolist()):
            isbad = dataset.kinds[i] == "corrupted"
            bad += isbad
            if not bool(rec["keep"][j]):
                dropped += 1
                dropped_bad += isbad
    return {"noise_precision": dropped_bad / max(1, dropped), "noise_recall": dropped_bad / max(1, bad)}


def bad_token_share(records, dataset: SFTSet) -> float:
    """Share of the tokens that received gradient whose label is a corrupted digit."""
    bad = total = 0
    for rec in records:
        for j, i in enumerate(rec["idx"].tolist()):
            if not bool(rec["keep"][j]):
                continue
            cols = [pos - 1 for pos in dataset.corrupt_pos[i]]
            if "token_mask" in rec:
                total += int(rec["token_mask"][j].sum())
                bad += sum(bool(rec["token_mask"][j, c]) for c in cols)
            else:
                total += ANSWER_DIGITS + 1
                bad += len(cols)
    return bad / max(1, total)


@torch.no_grad()
def eu_plane(model, dataset: SFTSet):
    """Per-sample (PPL, Ent) of the whole SFT set under the given model, via the plugin's op."""
    from qtuning_plugin.core import sample_stats
    from qtuning_plugin.modeling import final_hidden_states, shifted_targets
    from qtuning_plugin.ops import token_stats

    model.eval()
    batch = {k: torch.stack([dataset[i][k] for i in range(len(dataset))]) for k in ("input_ids", "labels", "attention_mask")}
    hidden = final_hidden_states(model, batch)
    targets = shifted_targets(batch["labels"])
    nll, ent = token_stats(hidden.reshape(-1, hidden.shape[-1]), model.lm_head.weight, targets.reshape(-1))
    nll, ent = nll.view(targets.shape), ent.view(targets.shape)
    ppl, sent = sample_stats(nll, ent, targets != -100)
    return ppl, sent, nll, ent, targets


def spec_fidelity(model, dataset) -> dict:
    """Plugin `select` vs the literal SPEC transcription (`tests/reference.py`) on micro-batches of our SFT set."""
    from qtuning_plugin import QTuningConfig, select

    sys.path.insert(0, str(HERE.parents[1] / "tests"))
    from reference import reference_select

    _, _, nll, ent, targets = eu_plane(model, dataset)
    mask = targets != -100
    checked = agree = 0
    for arm in ("qtuning_25x70", "qtuning_12.5x50", "reversed_25x70", "triage_only_25"):
        spec = ARMS[arm].qtuning
        cfg = QTuningConfig(**spec)
        for start in range(0, 320, SFT["batch"]):
            sl = slice(start, start + SFT["batch"])
            sel = select(nll[sl], ent[sl], mask[sl], cfg)
            keep, q2, tok = reference_select(nll[sl], ent[sl], mask[sl], spec["sample_keep_ratio"], spec["token_keep_ratio"],
                                             prune_highest=spec.get("prune_highest_scores", True))
            same = torch.equal(sel.sample_mask, keep) and torch.equal(sel.q2, q2) and torch.equal(sel.token_mask, tok)
            checked += 1
            agree += bool(same)
    return {"micro_batches_checked": checked, "identical_to_reference": agree}


def describe_set(base, dataset: SFTSet, into: dict):
    """The EU plane of an SFT set under the pre-trained model (returned, medians per type stored in ``into``),
    the SPEC fidelity check on it, and the share of its fresh items the pre-trained model already solves."""
    ppl, ent, *_ = eu_plane(base, dataset)
    into["eu_plane_at_start"] = {t: {
        "median_ppl": float(ppl[[i for i, k in enumerate(dataset.kinds) if k == t]].median()),
        "median_ent": float(ent[[i for i, k in enumerate(dataset.kinds) if k == t]].median())} for t in TYPES}
    into["spec_fidelity"] = spec_fidelity(base, dataset)
    fresh = [decode(dataset.rows[i]) for i, k in enumerate(dataset.kinds) if k == "fresh"]
    into["fresh_items_already_solved"] = float(greedy_correct(base, fresh).float().mean())
    return ppl.tolist(), ent.tolist(), dataset.kinds


def triage_batch_sizes(plain_records, seed, base_state, dataset, steps, work, test, log) -> dict:
    """The step-scope arms (`STEP_SCOPE_ARMS`): accuracy, step cost, and their selections step by step against
    mbs 32 x GA 1's and against the plugin's own micro-batch triage at mbs 32 (``plain_records``)."""
    out, reference = {}, None
    for name in STEP_SCOPE_ARMS:
        res = run_arm(name, seed, base_state, dataset, steps, work, test)
        if reference is None:
            reference = res["records"]
        out[name] = {"acc": res["acc"], "median_step_cpu_s": res["median_step_cpu_s"], "tokens": res["tokens"],
                     "same_as_32x1": same_selections(res["records"], reference),
                     "same_as_plain_plugin_mbs32": same_selections(res["records"], plain_records)}
        log(f"digits_30 seed {seed} {name}: acc {res['acc']:5.1f}, selection vs 32x1 {out[name]['same_as_32x1']}, "
            f"vs the plugin at mbs 32 {out[name]['same_as_plain_plugin_mbs32']}")
    return out


# ----------------------------------------------------------------------------- summary
def condition_name(kind: str, level: float) -> str:
    return f"{kind if level else 'clean'}_{round(level * 100)}"


def summarize_run(name: str, res: dict, dataset: SFTSet) -> dict:
    """What is kept of one run: accuracy, curve, cost, and where the noise went (not the raw records)."""
    arm = ARMS.get(name) or STEP_SCOPE_ARMS[name]
    out = {key: value for key, value in res.items() if key != "records"}
    out["bad_token_share"] = bad_token_share(res["records"], dataset)
    if arm.kind == "qtuning":
        out.update(noise_analysis(res["records"], dataset))
    elif arm.kind != "full":
        out.update(random_drop_pr(res["records"], dataset))
    return out


def step_cost_ratios(runs: dict, conditions: list[str], arms: list[str]) -> dict[str, float]:
    """Each arm's step cost over full-data SFT's: the median, over the equal-step runs of ``conditions`` and seeds,
    of its median step CPU time over full-data SFT's in the same condition and seed."""
    ratios = {}
    for name in arms:
        pairs = [(run, full) for cond in conditions
                 for run, full in zip(runs[cond]["equal_steps"][name], runs[cond]["equal_steps"]["full"])]
        ratios[name] = statistics.median(run["median_step_cpu_s"] / full["median_step_cpu_s"] for run, full in pairs)
    return ratios


def add_costs(runs: list[dict], ratio: float, full_steps: int) -> None:
    """Give every curve point its training cost, as a fraction of full-data SFT's ``full_steps`` steps."""
    for run in runs:
        for point in run["curve"]:
            point["cost"] = point["step"] * ratio / full_steps


def mean_std(xs):
    return (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)


def aggregate(runs: list[dict]) -> dict:
    """Mean (and std of the accuracy) over seeds; curves averaged point by point."""
    m, s = mean_std([r["acc"] for r in runs])
    out = {"acc": [r["acc"] for r in runs], "acc_mean": m, "acc_std": s}
    for key in ("steps", "tokens", "median_step_cpu_s", "train_cpu_s", "median_step_wall_s", "train_wall_s", "bad_token_share", "noise_precision", "noise_recall",
                "corrupted_in_q2", "q2_corrupted_all_bad_tokens_pruned"):
        if key in runs[0]:
            out[key] = statistics.mean(r[key] for r in runs)
    if "quadrants" in runs[0]:
        out["quadrants"] = {t: {q: statistics.mean(r["quadrants"][t][q] for r in runs) for q in runs[0]["quadrants"][t]}
                            for t in TYPES}
    out["curve"] = [{key: statistics.mean(r["curve"][i][key] for r in runs) for key in runs[0]["curve"][i]}
                    for i in range(len(runs[0]["curve"]))]
    return out


def same_selections(records: list[dict], reference: list[dict]) -> dict:
    """Steps whose selection (samples in order, kept, Q2, token mask) equals the reference's, and the first that does not."""
    same = [len(a["idx"]) == len(b["idx"]) and all(torch.equal(a[k], b[k]) for k in ("idx", "keep", "q2", "token_mask"))
            for a, b in zip(records, reference)]
    first = next((i + 1 for i, ok in enumerate(same) if not ok), None)
    return {"steps": len(reference), "identical_steps": sum(same) if len(records) == len(reference) else 0,
            "first_different_step": first}


def pct(x) -> str:
    return f"{x * 100:.0f}%" if x is not None else "-"


def tables(summary: dict, arms: list[str], main_conditions: list[str], ratios: dict, grid: dict, step_scope: dict) -> dict:
    """The markdown tables printed and stored in the JSON."""
    out = {}
    for cond in main_conditions:
        eq, et = summary[cond]["equal_steps"], summary[cond].get("equal_time", {})
        lines = ["| arm | equal steps: exact match | tokens with gradient | step cost / full's | "
                 "equal time: steps | exact match | tokens with gradient | run time / full's |", "|" + "---|" * 8]
        for arm in arms:
            r = eq[arm]
            row = f"| {arm} | {r['acc_mean']:.1f} ± {r['acc_std']:.1f} | {r['tokens']:.0f} | "
            row += f"{ratios[arm]:.2f} | " if arm in ratios else "- | "
            if arm in et:
                t = et[arm]
                row += (f"{t['steps']:.0f} | {t['acc_mean']:.1f} ± {t['acc_std']:.1f} | {t['tokens']:.0f} | "
                        f"{t['train_cpu_s'] / eq['full']['train_cpu_s']:.2f} |")
            else:
                row += "- | - | - | - |"
            lines.append(row)
        out[f"{cond}_compute"] = "\n".join(lines)
        lines = ["| arm | drop precision (corrupted) | drop recall (corrupted) | corrupted in Q2 | "
                 "Q2-corrupted with all bad tokens pruned | corrupted share of gradient tokens |", "|" + "---|" * 6]
        for arm in arms:
            r = eq[arm]
            lines.append(f"| {arm} | {pct(r.get('noise_precision'))} | {pct(r.get('noise_recall'))} | "
                         f"{pct(r.get('corrupted_in_q2'))} | {pct(r.get('q2_corrupted_all_bad_tokens_pruned'))} | "
                         f"{r['bad_token_share'] * 100:.1f}% |")
        out[f"{cond}_noise_analysis"] = "\n".join(lines)
        lines = ["| arm | type | Q1 | Q2 (kept, pruned) | Q3 | Q4 (kept) | middle |", "|---|---|---|---|---|---|---|"]
        for arm in arms:
            if "quadrants" in eq[arm]:
                for t in TYPES:
                    q = eq[arm]["quadrants"][t]
                    lines.append(f"| {arm} | {t} | " + " | ".join(pct(q[k]) for k in ("Q1", "Q2", "Q3", "Q4", "middle")) + " |")
        out[f"{cond}_quadrants"] = "\n".join(lines)
    columns = {cond: f"{kind} {level}%" if level else "no noise"
               for kind, levels in grid.items() for level, cond in levels.items() if cond in summary}
    lines = ["| arm | " + " | ".join(columns.values()) + " |", "|" + "---|" * (len(columns) + 1)]
    for arm in arms:
        lines.append(f"| {arm} | " + " | ".join(f"{summary[c]['equal_steps'][arm]['acc_mean']:.1f} ± "
                                                f"{summary[c]['equal_steps'][arm]['acc_std']:.1f}" for c in columns) + " |")
    out["noise_levels"] = "\n".join(lines)
    if step_scope:
        lines = ["| triage batch: micro-batch x accumulation | exact match | steps with the selection of 32 x 1 | "
                 "first step that differs | median step, ms CPU |", "|---|---|---|---|---|"]
        for name, r in step_scope.items():
            same = r["same_as_32x1"]
            lines.append(f"| {name.rsplit('_', 1)[1].replace('x', ' x ')} | {r['acc']:.1f} | "
                         f"{same['identical_steps']} / {same['steps']} | {same['first_different_step'] or '-'} | "
                         f"{r['median_step_cpu_s'] * 1000:.1f} |")
        out["triage_batch"] = "\n".join(lines)
    return out


# ----------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="1 seed, 40 steps, 500 held-out items, noise levels 0/30/70: the smoke test")
    parser.add_argument("--seeds", type=int, default=None, help="seeds at the 30%% level (default 3; --quick 1)")
    parser.add_argument("--grid-seeds", type=int, default=None, help="seeds at the other noise levels (default 2; --quick 1)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--cache-dir", default=os.environ.get("QTUNING_QUALITY_CACHE", str(pathlib.Path.home() / ".cache/qtuning/quality")))
    parser.add_argument("--out", default=str(HERE))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.getLogger("qtuning_plugin").setLevel(logging.WARNING)
    sys.path[:0] = [str(HERE), str(HERE.parent)]  # trainers.py, figures.py; benchmarks/_common.py
    import figures

    t0 = time.time()
    log = lambda msg: print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)
    arms = args.arms.split(",")
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"--arms: unknown {unknown}; choose from {list(ARMS)}")
    seeds_main = args.seeds or (1 if args.quick else 3)
    seeds_grid = args.grid_seeds or (1 if args.quick else 2)
    levels = (0.0, MAIN_LEVEL, 0.7) if args.quick else NOISE_LEVELS
    steps = 40 if args.quick else SFT["n_items"] * SFT["epochs"] // SFT["batch"]
    test, val, exclude = eval_splits()
    if args.quick:
        test = test[:500]
    # The 30% conditions first (equal compute), then the rest of the grid; 0% is one set for both kinds.
    conditions = [(kind, MAIN_LEVEL) for kind in ("digits", "answer")]
    conditions += [("digits", 0.0)] + [(kind, lv) for kind in ("digits", "answer") for lv in levels if lv not in (0.0, MAIN_LEVEL)]
    main_conditions = [condition_name(kind, MAIN_LEVEL) for kind in ("digits", "answer")]
    grid = {kind: {round(lv * 100): condition_name(kind, lv) for lv in levels} for kind in ("digits", "answer")}

    base, pre_info = pretrain(pathlib.Path(args.cache_dir), val, exclude, log)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    pre_acc = 100 * float(greedy_correct(base, test).float().mean())
    log(f"pre-trained model: held-out exact match {pre_acc:.1f}%; SFT: full fine-tuning, {steps} steps x {SFT['batch']} samples")

    work = pathlib.Path(args.cache_dir) / "runs"
    runs = defaultdict(lambda: {"equal_steps": defaultdict(list), "equal_time": defaultdict(list)})
    extra, planes, step_scope, main_sets = defaultdict(dict), {}, {}, {}
    # 1. Equal steps, every condition (the 30% ones with curves); the triage batch sizes on digits 30%.
    for kind, level in conditions:
        cond = condition_name(kind, level)
        main_level = level == MAIN_LEVEL
        for seed in range(seeds_main if main_level else seeds_grid):
            dataset = build_sft_set(seed, base, exclude, kind, level)
            if main_level:
                main_sets[cond, seed] = dataset
            if main_level and seed == 0:
                planes[cond] = describe_set(base, dataset, extra[cond])
                log(f"{cond}: EU plane before SFT (medians) {json.dumps(extra[cond]['eu_plane_at_start'])}; "
                    f"SPEC fidelity {extra[cond]['spec_fidelity']}")
            for name in arms:
                res = run_arm(name, seed, base_state, dataset, steps, work, test, CURVE_POINTS if main_level else 1)
                runs[cond]["equal_steps"][name].append(summarize_run(name, res, dataset))
                log(f"{cond} seed {seed} {name:>16} {steps:4d} steps: acc {res['acc']:5.1f}  tokens {res['tokens']:>6}  "
                    f"median step {res['median_step_cpu_s'] * 1000:.1f} ms CPU, {res['median_step_wall_s'] * 1000:.1f} ms wall")
                if cond == "digits_30" and seed == 0 and name == "qtuning_25x70":
                    step_scope = triage_batch_sizes(res["records"], seed, base_state, dataset, steps, work, test, log)
    # 2. Each arm's step cost relative to full-data SFT's, from the 30% conditions' equal-step runs.
    ratios = step_cost_ratios(runs, main_conditions, arms) if "full" in arms else {}
    for cond in main_conditions:
        for name, ratio in ratios.items():
            add_costs(runs[cond]["equal_steps"][name], ratio, steps)
    # 3. Equal training time: the pruned arms for full-data SFT's cost.
    for (cond, seed), dataset in main_sets.items():
        for name in (a for a in ratios if a != "full"):
            n = max(1, round(steps / ratios[name]))
            res = run_arm(name, seed, base_state, dataset, n, work, test, CURVE_POINTS)
            runs[cond]["equal_time"][name].append(summarize_run(name, res, dataset))
            add_costs(runs[cond]["equal_time"][name][-1:], ratios[name], steps)
            log(f"{cond} seed {seed} {name:>16} {n:4d} steps (equal time): acc {res['acc']:5.1f}  tokens {res['tokens']:>6}")

    summary = {cond: {budget: {arm: aggregate(r) for arm, r in by_arm.items()} for budget, by_arm in by_budget.items() if by_arm}
               for cond, by_budget in runs.items()}
    tabs = tables(summary, arms, [c for c in main_conditions if c in summary], ratios, grid, step_scope)
    print(f"\nbefore SFT: {pre_acc:.1f}% held-out exact match; {steps} SFT steps x {SFT['batch']} samples; "
          f"seeds: {seeds_main} at {MAIN_LEVEL:.0%} noise, {seeds_grid} at the other levels")
    for title, table in tabs.items():
        print(f"\n{title}\n{table}")

    out = pathlib.Path(args.out)
    suffix = "_quick" if args.quick else ""
    for cond in main_conditions:
        if cond in planes:
            figures.plot_arms(summary[cond], arms, planes[cond], pre_acc, f"{cond.replace('_', ' ')}% corrupted",
                              out / f"quality{'' if cond == 'digits_30' else '_answer'}{suffix}.png")
    if "full" in arms:
        figures.plot_compute({c: summary[c] for c in main_conditions}, arms, pre_acc, out / f"quality_compute{suffix}.png")
    figures.plot_noise(summary, grid, arms, pre_acc, out / f"quality_noise{suffix}.png")

    accuracy = {f"{cond}/{budget}": {arm: round(s["acc_mean"], 2) for arm, s in by_arm.items()}
                for cond, by_budget in summary.items() for budget, by_arm in by_budget.items()}
    if step_scope:
        accuracy["digits_30/triage_batch"] = {name: round(r["acc"], 2) for name, r in step_scope.items()}
    total = time.time() - t0
    result = {
        "unit": "% held-out exact match", "accuracy": accuracy, "pretrained_accuracy": round(pre_acc, 2),
        "sft_steps": steps, "step_cost_vs_full": {arm: round(r, 3) for arm, r in ratios.items()},
        "seeds": {"noise_30": seeds_main, "other_levels": seeds_grid}, "quick": args.quick,
        "total_wall_s": round(total, 1),
    }
    (out / f"results{suffix}.json").write_text(json.dumps(
        {**result, "pretrain": pre_info, "micro_batch": SFT["batch"], "curve_points": CURVE_POINTS, "summary": summary,
         "triage_batch": step_scope, "conditions": extra, "tables": tabs}, indent=1))
    print(f"\ntotal wall time {total:.1f} s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Does Q-Tuning beat full-data SFT? A controlled miniature with known ground truth (issue 7).

    python benchmarks/quality/run.py            # 3 seeds, the whole comparison (< 30 min on 1 CPU core)
    python benchmarks/quality/run.py --quick    # 1 seed, 2 epochs' worth of steps (< 5 min, from scratch too)
    python benchmarks/quality/run.py --noise answer   # task-design variant: whole answers redrawn

Task: 3-digit addition, written plainly ("<s>123+456=" -> "0579</s>"), character
tokens (vocabulary 16), a 3-layer Llama (hidden 128) built in-process.

1. Pre-training: plain causal-LM training (prompt masked) on random problems
   until exact match on a *validation* split first reaches 35% (checked every
   10 steps from step 600, at most 2500 steps). Cached under
   ``$QTUNING_QUALITY_CACHE`` (default ``~/.cache/qtuning/quality``), keyed by
   the settings.
2. SFT set, per seed (1600 items, fixed length 14 tokens, 5 trainable each):
   * 30% corrupted: a fresh problem whose answer has 1 or 2 digits replaced by
     another digit (the positions are recorded);
   * 30% redundant: near-duplicates (a+b or b+a, repeated) of 80 problems the
     pre-trained model already solves in both orders;
   * 40% fresh: new problems with correct answers.
3. Six arms, full fine-tuning of the whole model, the same micro-batch (32), the
   same number of optimizer steps, the same learning-rate schedule, seed and
   data order; they differ only in what the loss sees:
   * full            -- every sample and token (QTuningTrainerMixin with enabled=False:
                        the model's own loss);
   * random_25       -- a random 25% of each micro-batch, all tokens (RandomPruneTrainer:
                        the mixin's two-pass path with a random choice instead of the
                        EU-plane triage, and no scoring pass);
   * qtuning_25x70   -- Q-Tuning, 25% samples x 70% tokens of Q2 samples;
   * qtuning_12.5x50 -- Q-Tuning, 12.5% x 50%;
   * reversed_25x70  -- 25% x 70% with prune_highest_scores=False (paper's ablation);
   * triage_only_25  -- 25% samples, token_keep_ratio=1.0;
   and two diagnostics that use the ground truth (not methods; outside the JSON
   "accuracy" keys): oracle_clean (drop exactly the corrupted samples) and
   oracle_25 (25% of each micro-batch, fresh items first, never a corrupted one
   while a clean one is left).
4. Held-out: 1000 clean problems, used only for the final greedy exact match.
   Validation (500 clean problems) is used only to stop pre-training.
   Neither set overlaps any training problem.

The last printed line is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import math
import os
import pathlib
import random
import statistics
import sys
import time
import warnings
from collections import defaultdict

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
SFT = dict(n_items=1600, frac_corrupt=0.30, frac_redundant=0.30, pool=80, batch=32, epochs=3,
           lr=5e-4, warmup_ratio=0.05)
N_TEST, N_VAL = 1000, 500
ARMS = {
    "full": None,
    "random_25": "random",
    "qtuning_25x70": dict(sample_keep_ratio=0.25, token_keep_ratio=0.7),
    "qtuning_12.5x50": dict(sample_keep_ratio=0.125, token_keep_ratio=0.5),
    "reversed_25x70": dict(sample_keep_ratio=0.25, token_keep_ratio=0.7, prune_highest_scores=False),
    "triage_only_25": dict(sample_keep_ratio=0.25, token_keep_ratio=1.0),
    # Diagnostics with ground-truth knowledge (not methods): how harmful is the noise here,
    # and what is the best any 25% selection could do at this number of steps?
    "oracle_clean": "oracle_clean",  # every non-corrupted sample of each micro-batch, all tokens
    "oracle_25": "oracle_25",  # 25% of each micro-batch: fresh first, then redundant, never corrupted if avoidable
}
MAIN_ARMS = ("full", "random_25", "qtuning_25x70", "qtuning_12.5x50", "reversed_25x70", "triage_only_25")
TYPES = ("corrupted", "redundant", "fresh")


def encode(a: int, b: int, answer: str | None = None) -> list[int]:
    if answer is None:
        answer = str(a + b).zfill(ANSWER_DIGITS)
    return [BOS] + [STOI[c] for c in f"{a:0{DIGITS}d}+{b:0{DIGITS}d}="] + [STOI[c] for c in answer] + [EOS]


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
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(settings["seed"])
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=settings["hidden"], intermediate_size=2 * settings["hidden"],
        num_hidden_layers=settings["layers"], num_attention_heads=settings["heads"],
        num_key_value_heads=settings["heads"], max_position_embeddings=32, tie_word_embeddings=False,
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config)


@torch.no_grad()
def greedy_correct(model, problems: list[tuple[int, int]], chunk: int = 500) -> torch.Tensor:
    """[N] bool: greedy decoding of the answer (4 digits + </s>) is exactly right."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(problems), chunk):
        rows = torch.tensor([encode(a, b) for a, b in problems[start:start + chunk]])
        x = rows[:, :PROMPT_LEN]
        for _ in range(SEQ_LEN - PROMPT_LEN):
            nxt = model(input_ids=x, use_cache=False, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
            x = torch.cat([x, nxt], dim=1)
        out.append((x[:, PROMPT_LEN:] == rows[:, PROMPT_LEN:]).all(dim=1))
    model.train(was_training)
    return torch.cat(out)


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


def build_sft_set(seed: int, model, exclude: set[int], noise: str = "digits") -> SFTSet:
    rng = random.Random(1000 + seed)
    used = set(exclude)
    n = SFT["n_items"]
    n_bad, n_red = round(SFT["frac_corrupt"] * n), round(SFT["frac_redundant"] * n)
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


# ----------------------------------------------------------------------------- trainers
def trainer_classes():
    from transformers import Trainer

    from qtuning_plugin import QTuningTrainerMixin
    from qtuning_plugin.modeling import final_hidden_states, lm_head_parameters, shifted_targets, unwrap_causal_lm
    from qtuning_plugin.ops.backends import resolve_backend
    from qtuning_plugin.trainer import kept_token_loss

    class Recording:
        """Records, per training micro-batch, the dataset indices and what the loss kept."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.records = []
            self.tokens_with_gradient = 0
            self._idx = None

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            self._idx = inputs.pop("idx", None)
            if model.training and not self.qtuning_config.enabled:  # full-data arm: every label
                self.tokens_with_gradient += int((inputs["labels"][:, 1:] != -100).sum())
                self.records.append({"idx": self._idx.cpu(), "keep": torch.ones(len(self._idx), dtype=torch.bool)})
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

        def _select(self, *args, **kwargs):
            sample_mask, token_mask = super()._select(*args, **kwargs)
            sel = self.qtuning_last_selection
            tri = sel.triage
            self.tokens_with_gradient += int(token_mask.sum())
            self.records.append({
                "idx": self._idx.cpu(), "keep": sel.sample_mask.cpu(), "q2": sel.q2.cpu(),
                "token_mask": sel.token_mask.cpu(), "ppl": sel.ppl.cpu(), "ent": sel.ent.cpu(),
                "thr": (tri.ppl_hi, tri.ppl_lo, tri.ent_lo, tri.ent_hi), "step": self.state.global_step,
            })
            return sample_mask, token_mask

    class QTuningTrainer(Recording, QTuningTrainerMixin, Trainer):
        pass

    class RandomPruneTrainer(Recording, QTuningTrainerMixin, Trainer):
        """Random sample pruning at the same budget: keep round(r * B) random rows, all their tokens.

        Same step as the mixin's two-pass path (forward + backward on the kept
        rows only, mean cross-entropy over their tokens with the same fused op),
        without the scoring forward, which a random choice does not need.
        """

        def qtuning_loss(self, model, inputs):
            labels = inputs["labels"]
            batch = labels.shape[0]
            if self._qtuning_backend is None:
                self._qtuning_backend = resolve_backend(self.qtuning_config.backend, labels.device)
            gen = getattr(self, "_rand_gen", None)
            if gen is None:
                gen = self._rand_gen = torch.Generator().manual_seed(self.args.seed)
            k = max(1, round(self.qtuning_config.sample_keep_ratio * batch))
            perm = torch.randperm(batch, generator=gen)
            oracle = getattr(self, "oracle", None)
            if oracle:  # ground-truth diagnostics: rank by type, randomly within a type
                kinds = [self.kinds[int(i)] for i in self._idx]
                rank = {"fresh": 0, "redundant": 1, "corrupted": 2}
                perm = torch.tensor(sorted(perm.tolist(), key=lambda j: rank[kinds[j]]))
                if oracle == "oracle_clean":
                    k = max(1, sum(kind != "corrupted" for kind in kinds))
            rows = perm[:k].sort().values.to(labels.device)
            sub = {key: value[rows] for key, value in inputs.items() if torch.is_tensor(value) and value.shape[:1] == (batch,)}
            targets = shifted_targets(sub["labels"])
            mask = targets != -100
            weight, bias = lm_head_parameters(unwrap_causal_lm(model))
            hidden = final_hidden_states(model, sub)
            self.tokens_with_gradient += int(mask.sum())
            keep = torch.zeros(batch, dtype=torch.bool)
            keep[rows.cpu()] = True
            self.records.append({"idx": self._idx.cpu(), "keep": keep, "step": self.state.global_step})
            return kept_token_loss(self._qtuning_backend, hidden, weight, bias, targets, mask)

    return QTuningTrainer, RandomPruneTrainer


def run_arm(arm: str, seed: int, base_state: dict, dataset: SFTSet, steps: int, out_dir: pathlib.Path, test):
    from transformers import TrainingArguments

    from qtuning_plugin import QTuningConfig

    QTuningTrainer, RandomPruneTrainer = trainer_classes()
    spec = ARMS[arm]
    model = build_model(PRETRAIN)
    model.load_state_dict(base_state)
    args = TrainingArguments(
        output_dir=str(out_dir / f"{arm}-{seed}"), per_device_train_batch_size=SFT["batch"], max_steps=steps,
        learning_rate=SFT["lr"], lr_scheduler_type="cosine", warmup_steps=max(1, round(SFT["warmup_ratio"] * steps)), weight_decay=0.0,
        seed=seed, data_seed=seed, use_cpu=True, report_to=[], save_strategy="no", logging_steps=max(1, steps // 4),
        dataloader_drop_last=True, disable_tqdm=True, remove_unused_columns=False,
    )
    if spec is None:
        cls, config = QTuningTrainer, QTuningConfig(enabled=False)
    elif spec in ("random", "oracle_clean", "oracle_25"):
        cls, config = RandomPruneTrainer, QTuningConfig(sample_keep_ratio=0.25, token_keep_ratio=1.0)
    else:
        cls, config = QTuningTrainer, QTuningConfig(backend="torch", **spec)
    trainer = cls(model=model, args=args, train_dataset=dataset, qtuning_config=config)
    if spec in ("oracle_clean", "oracle_25"):
        trainer.oracle, trainer.kinds = spec, dataset.kinds
    start = time.time()
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.train()
    wall = time.time() - start
    acc = float(greedy_correct(model, test).float().mean())
    return {"acc": acc, "wall_s": wall, "tokens": trainer.tokens_with_gradient, "records": trainer.records,
            "final_loss": next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None)}


# ----------------------------------------------------------------------------- analysis
def noise_analysis(records, dataset: SFTSet) -> dict:
    """Where the ground-truth types land on the EU plane during training, and P/R of the drops."""
    kinds = dataset.kinds
    counts = {t: defaultdict(int) for t in TYPES}
    dropped = dropped_bad = bad_total = 0
    bad_q2 = bad_q2_all_pruned = bad_q2_any_pruned = 0
    for rec in records:
        ppl_hi, ppl_lo, ent_lo, ent_hi = rec["thr"]
        for j, i in enumerate(rec["idx"].tolist()):
            kind = kinds[i]
            keep, q2 = bool(rec["keep"][j]), bool(rec["q2"][j])
            p, e = float(rec["ppl"][j]), float(rec["ent"][j])
            if keep:
                quad = "Q2" if q2 else "Q4"
            elif p > ppl_hi and e > ent_hi:
                quad = "Q1"
            elif p <= ppl_lo and e <= ent_lo:
                quad = "Q3"
            else:
                quad = "middle"
            counts[kind][quad] += 1
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
    quadrants = {t: {q: counts[t][q] / max(1, counts[t]["n"]) for q in ("Q1", "Q2", "Q3", "Q4", "middle")} for t in TYPES}
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
        spec = ARMS[arm]
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


# ----------------------------------------------------------------------------- main
def mean_std(xs):
    return (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)


def plot(results, arms, plane, out_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    ax = axes[0]
    means = [results[a]["acc_mean"] * 100 for a in arms]
    stds = [results[a]["acc_std"] * 100 for a in arms]
    palette = {"full": "#777777", "random_25": "#bbbbbb", "qtuning_25x70": "#1f77b4", "qtuning_12.5x50": "#2ca02c",
               "reversed_25x70": "#d62728", "triage_only_25": "#9467bd", "oracle_clean": "#ffffff", "oracle_25": "#ffffff"}
    bars = ax.bar(range(len(arms)), means, yerr=stds, capsize=4, color=[palette.get(a, "#cccccc") for a in arms], edgecolor="k")
    for bar, a in zip(bars, arms):
        if a not in MAIN_ARMS:
            bar.set_hatch("//")
    for i, a in enumerate(arms):
        for v in results[a]["acc"]:
            ax.plot(i, v * 100, "k.", ms=4)
    ax.axhline(results["_pretrained_acc"] * 100, ls="--", c="k", lw=0.8, label="before SFT")
    ax.set_xticks(range(len(arms)), arms, rotation=25, ha="right")
    ax.set_ylabel("held-out exact match (%)")
    ax.set_title("held-out accuracy (mean ± std, dots = seeds; hatched = oracle diagnostics)", fontsize=9)
    ax.legend(loc="lower right")
    ax = axes[1]
    ppl, ent, kinds = plane
    for kind, c in (("fresh", "#1f77b4"), ("redundant", "#ff7f0e"), ("corrupted", "#d62728")):
        sel = [i for i, k in enumerate(kinds) if k == kind]
        ax.scatter([math.log(ppl[i]) for i in sel], [ent[i] for i in sel], s=5, alpha=0.5, c=c, label=kind)
    ax.set_xlabel("log PPL (error)")
    ax.set_ylabel("mean entropy, nats (uncertainty)")
    ax.set_title("EU plane of the SFT set (seed 0) under the pre-trained model")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 epochs' worth of steps, 500 test items")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--noise", choices=("digits", "answer"), default="digits",
                        help="corruption: 1-2 answer digits replaced (default) or the whole answer redrawn (task-design variant)")
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
    t0 = time.time()
    log = lambda msg: print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)

    seeds = list(range(args.seeds if args.seeds else (1 if args.quick else 3)))
    arms = args.arms.split(",")
    steps = SFT["n_items"] * SFT["epochs"] // SFT["batch"]
    if args.quick:
        steps = SFT["n_items"] * 2 // SFT["batch"]
    test, val, exclude = eval_splits()
    if args.quick:
        test = test[:500]

    base, pre_info = pretrain(pathlib.Path(args.cache_dir), val, exclude, log)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    pre_acc = float(greedy_correct(base, test).float().mean())
    log(f"pre-trained model: held-out exact match {pre_acc:.3f}; SFT: full fine-tuning, {steps} steps x micro-batch {SFT['batch']}")

    results = {a: {"acc": [], "wall_s": [], "tokens": [], "pr": [], "bad_share": []} for a in arms}
    extra = {}
    plane = None
    work = pathlib.Path(args.cache_dir) / "runs"
    for seed in seeds:
        dataset = build_sft_set(seed, base, exclude, args.noise)
        fresh_idx = [i for i, k in enumerate(dataset.kinds) if k == "fresh"]
        if seed == seeds[0]:
            ppl, ent, *_ = eu_plane(base, dataset)
            plane = (ppl.tolist(), ent.tolist(), dataset.kinds)
            by_type = {t: {"median_ppl": float(ppl[[i for i, k in enumerate(dataset.kinds) if k == t]].median()),
                           "median_ent": float(ent[[i for i, k in enumerate(dataset.kinds) if k == t]].median())} for t in TYPES}
            extra["eu_plane_at_start"] = by_type
            extra["spec_fidelity"] = spec_fidelity(base, dataset)
            log(f"EU plane of the SFT set before SFT (medians): {json.dumps(by_type)}")
            log(f"SPEC fidelity check: {extra['spec_fidelity']}")
            fresh_solved = float(greedy_correct(base, [(int(''.join(str(d - 3) for d in dataset.rows[i, 1:4].tolist())),
                                                        int(''.join(str(d - 3) for d in dataset.rows[i, 5:8].tolist())))
                                                       for i in fresh_idx]).float().mean())
            extra["fresh_items_already_solved"] = fresh_solved
        for arm in arms:
            res = run_arm(arm, seed, base_state, dataset, steps, work, test)
            results[arm]["acc"].append(res["acc"])
            results[arm]["wall_s"].append(res["wall_s"])
            results[arm]["tokens"].append(res["tokens"])
            results[arm]["bad_share"].append(bad_token_share(res["records"], dataset))
            if ARMS[arm] in ("random", "oracle_clean", "oracle_25"):
                results[arm]["pr"].append(random_drop_pr(res["records"], dataset))
            elif ARMS[arm] is not None:
                results[arm]["pr"].append(noise_analysis(res["records"], dataset))
            log(f"seed {seed} {arm:>16}: acc {res['acc']:.3f}  tokens {res['tokens']:>6}  "
                f"train wall {res['wall_s']:.1f}s  final loss {res['final_loss']}")

    summary = {"_pretrained_acc": pre_acc}
    for arm in arms:
        r = results[arm]
        m, s = mean_std(r["acc"])
        summary[arm] = {"acc": r["acc"], "acc_mean": m, "acc_std": s, "tokens": statistics.mean(r["tokens"]),
                        "wall_s": statistics.mean(r["wall_s"]), "bad_token_share": statistics.mean(r["bad_share"])}
        if r["pr"]:
            for k in r["pr"][0]:
                if k != "quadrants":
                    summary[arm][k] = statistics.mean(p[k] for p in r["pr"])
            if "quadrants" in r["pr"][0]:
                summary[arm]["quadrants"] = {t: {q: statistics.mean(p["quadrants"][t][q] for p in r["pr"])
                                                 for q in r["pr"][0]["quadrants"][t]} for t in TYPES}

    # ---- table
    header = f"| arm | held-out exact match (mean ± std, {len(seeds)} seeds) | tokens with gradient | train wall (s) | drop precision (corrupted) | drop recall (corrupted) | corrupted in Q2 | Q2-corrupted with all bad tokens pruned | corrupted share of gradient tokens |"
    lines = [header, "|" + "---|" * 9]
    for arm in arms:
        r = summary[arm]
        pr = lambda k, r=r: f"{r[k] * 100:.0f}%" if k in r else "-"
        lines.append(f"| {arm} | {r['acc_mean'] * 100:.1f} ± {r['acc_std'] * 100:.1f} | {r['tokens']:.0f} | {r['wall_s']:.1f} | "
                     f"{pr('noise_precision')} | {pr('noise_recall')} | {pr('corrupted_in_q2')} | {pr('q2_corrupted_all_bad_tokens_pruned')} | {r['bad_token_share'] * 100:.1f}% |")
    table = "\n".join(lines)
    print()
    print(f"noise: {args.noise}; before SFT: {pre_acc * 100:.1f}% held-out exact match; {steps} SFT steps x {SFT['batch']}; seeds {seeds}")
    print(table)
    quad_lines = ["| arm | type | Q1 | Q2 (kept, pruned) | Q3 | Q4 (kept) | middle |", "|---|---|---|---|---|---|---|"]
    for arm in arms:
        if "quadrants" in summary[arm]:
            for t in TYPES:
                q = summary[arm]["quadrants"][t]
                quad_lines.append(f"| {arm} | {t} | " + " | ".join(f"{q[k] * 100:.0f}%" for k in ("Q1", "Q2", "Q3", "Q4", "middle")) + " |")
    quad_table = "\n".join(quad_lines)
    print()
    print("Where each ground-truth type lands during training (share of its occurrences, by the last bisection iterate):")
    print(quad_table)

    out = pathlib.Path(args.out)
    suffix = ("_quick" if args.quick else "") + ("" if args.noise == "digits" else f"_{args.noise}")
    if plane is not None:
        plot(summary, arms, plane, out / f"quality{suffix}.png")
    total = time.time() - t0
    result = {
        "accuracy": {a: summary[a]["acc_mean"] for a in arms if a in MAIN_ARMS},
        "diagnostic_accuracy": {a: summary[a]["acc_mean"] for a in arms if a not in MAIN_ARMS},
        "noise_recall": summary.get("qtuning_25x70", {}).get("noise_recall"),
        "noise_precision": summary.get("qtuning_25x70", {}).get("noise_precision"),
        "accuracy_std": {a: summary[a]["acc_std"] for a in arms},
        "accuracy_per_seed": {a: summary[a]["acc"] for a in arms},
        "tokens_with_gradient": {a: summary[a]["tokens"] for a in arms},
        "train_wall_s": {a: round(summary[a]["wall_s"], 2) for a in arms},
        "noise_precision_recall_per_arm": {a: {k: summary[a][k] for k in ("noise_precision", "noise_recall") if k in summary[a]} for a in arms},
        "corrupted_in_q2": {a: summary[a]["corrupted_in_q2"] for a in arms if "corrupted_in_q2" in summary[a]},
        "q2_corrupted_all_bad_tokens_pruned": {a: summary[a]["q2_corrupted_all_bad_tokens_pruned"] for a in arms if "q2_corrupted_all_bad_tokens_pruned" in summary[a]},
        "corrupted_share_of_gradient_tokens": {a: summary[a]["bad_token_share"] for a in arms},
        "pretrained_accuracy": pre_acc,
        "pretrain": pre_info,
        "sft_steps": steps, "micro_batch": SFT["batch"], "seeds": seeds, "quick": args.quick, "noise": args.noise,
        **extra,
        "total_wall_s": round(total, 1),
    }
    (out / f"results{suffix}.json").write_text(json.dumps(
        {**result, "summary": summary, "table": table, "quadrant_table": quad_table}, indent=2))
    print(f"\ntotal wall time {total:.1f} s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

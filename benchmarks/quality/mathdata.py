"""Grade-school word problems with short worked answers, and the ways SFT data goes wrong (real-model track).

Every problem is drawn from one of `TEMPLATES` (five operations: addition, subtraction,
multiplication, exact division, and two-step problems), with a name, an item and numbers
drawn at random. A worked answer is one or two equations and the sentence
``The answer is N.``; its final number is what the benchmark grades.

A corrupted response (`CORRUPTIONS`) is one of:

* ``wrong_number``: the solution of the same problem with one computed number wrong (an
  arithmetic slip, carried on to the final answer): right-looking, wrong (in rare two-step
  cases the carried slip makes the final answer negative);
* ``mismatched``: the correct solution of another problem of the set (a misaligned join);
* ``truncated``: the correct solution cut off before its final answer (a length limit);
* ``off_topic``: a fluent sentence that has nothing to do with the problem (scraping noise).

Splits never share a problem: a problem is identified by its template and numbers
(`Problem.key`), and every split draws from the keys the earlier ones left.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

NAMES = ("Ann", "Ben", "Carla", "Dev", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jack", "Kira", "Leo",
         "Maya", "Noah", "Olga", "Pablo", "Quinn", "Rosa", "Sam", "Tara", "Umar", "Vera", "Will", "Yuki")
ITEMS = ("apples", "pens", "stickers", "marbles", "books", "cookies", "shells", "stamps", "cards", "coins",
         "flowers", "buttons", "candles", "pencils", "toy cars")

# (operation, question template, how to draw the numbers). Numbers are named a, b, c.
TEMPLATES = (
    ("add", "{n} has {a} {i}. {n} gets {b} more. How many {i} does {n} have now?"),
    ("add", "A box holds {a} {i} and a bag holds {b} {i}. How many {i} are there in all?"),
    ("add", "{n} collected {a} {i} on Monday and {b} on Tuesday. How many {i} did {n} collect?"),
    ("sub", "{n} had {a} {i} and gave {b} to a friend. How many {i} does {n} have left?"),
    ("sub", "There are {a} {i} on a table. {n} takes {b} of them. How many {i} are still on the table?"),
    ("mul", "{n} buys {a} packs with {b} {i} in each pack. How many {i} does {n} buy?"),
    ("mul", "A shelf has {a} rows with {b} {i} in each row. How many {i} are on the shelf?"),
    ("div", "{n} shares {a} {i} equally among {b} friends. How many {i} does each friend get?"),
    ("div", "{a} {i} are put into {b} equal groups. How many {i} are in each group?"),
    ("add_sub", "{n} has {a} {i}, gets {b} more and then gives away {c}. How many {i} does {n} have now?"),
    ("mul_sub", "{n} buys {a} packs of {b} {i} and loses {c} of them. How many {i} are left?"),
)

OFF_TOPIC = (
    "I love going to the park on sunny days and feeding the ducks.",
    "Here is a fun fact: an octopus has three hearts.",
    "Sorry, I cannot help with that request.",
    "The weather today is cloudy with a chance of rain in the evening.",
    "Paris is the capital of France and is famous for the Eiffel Tower.",
    "Remember to drink enough water and get a good night's sleep.",
    "My favourite colour is blue because it reminds me of the sea.",
    "Thank you for your question! Let me know if there is anything else.",
)
CORRUPTIONS = ("wrong_number", "mismatched", "truncated", "off_topic")
ANSWER = re.compile(r"The answer is:?\s*\$?(-?[\d,]+)")
NUMBER = re.compile(r"-?\d[\d,]*")


@dataclass(frozen=True)
class Problem:
    """One word problem: its question, its worked solution and its final answer."""

    template: int
    numbers: tuple[int, ...]
    name: str
    item: str

    @property
    def key(self) -> tuple:
        return (self.template, self.numbers)

    @property
    def question(self) -> str:
        a, b, c = (self.numbers + (0,))[:3]
        return TEMPLATES[self.template][1].format(n=self.name, i=self.item, a=a, b=b, c=c)

    def steps(self) -> list[tuple[int, str, int, int]]:
        """The worked solution as ``(x, op, y, result)`` equations."""
        op = TEMPLATES[self.template][0]
        a, b = self.numbers[:2]
        if op == "add":
            return [(a, "+", b, a + b)]
        if op == "sub":
            return [(a, "-", b, a - b)]
        if op == "mul":
            return [(a, "*", b, a * b)]
        if op == "div":
            return [(a, "/", b, a // b)]
        c = self.numbers[2]
        first = (a, "+", b, a + b) if op == "add_sub" else (a, "*", b, a * b)
        return [first, (first[3], "-", c, first[3] - c)]

    @property
    def answer(self) -> int:
        return self.steps()[-1][3]

    def solution(self, steps: list[tuple[int, str, int, int]] | None = None) -> str:
        steps = steps or self.steps()
        return " ".join(f"{x} {op} {y} = {r}." for x, op, y, r in steps) + f" The answer is {steps[-1][3]}."


def draw_numbers(op: str, rng: random.Random) -> tuple[int, ...]:
    if op == "add":
        return (rng.randint(10, 99), rng.randint(10, 99))
    if op == "sub":
        a = rng.randint(20, 99)
        return (a, rng.randint(5, a - 5))
    if op == "mul":
        return (rng.randint(2, 12), rng.randint(2, 12))
    if op == "div":
        b, q = rng.randint(2, 9), rng.randint(2, 12)
        return (b * q, b)
    a, b = (rng.randint(10, 60), rng.randint(10, 60)) if op == "add_sub" else (rng.randint(2, 9), rng.randint(2, 9))
    total = a + b if op == "add_sub" else a * b
    return (a, b, rng.randint(1, total - 1))


def draw_problems(rng: random.Random, n: int, used: set) -> list[Problem]:
    """``n`` new problems (keys not in ``used``, which is updated)."""
    out = []
    while len(out) < n:
        template = rng.randrange(len(TEMPLATES))
        problem = Problem(template, draw_numbers(TEMPLATES[template][0], rng), rng.choice(NAMES), rng.choice(ITEMS))
        if problem.key not in used:
            used.add(problem.key)
            out.append(problem)
    return out


@dataclass
class Example:
    """One SFT item: a problem, the response it was given, and which characters of it are wrong.

    ``bad_spans`` are ``(start, end)`` character ranges of ``response`` that are wrong (the whole
    response for mismatched, truncated and off-topic ones; the wrong numbers for wrong_number).
    """

    problem: Problem
    response: str
    kind: str = "clean"  # "clean" or one of CORRUPTIONS
    bad_spans: list[tuple[int, int]] = field(default_factory=list)


def corrupt(problem: Problem, kind: str, rng: random.Random, other: Problem) -> Example:
    """``problem`` with a response corrupted as ``kind``; ``other`` lends its solution to a mismatch."""
    if kind == "mismatched":
        response = other.solution()
        return Example(problem, response, kind, [(0, len(response))])
    if kind == "off_topic":
        response = rng.choice(OFF_TOPIC)
        return Example(problem, response, kind, [(0, len(response))])
    if kind == "truncated":
        full = problem.solution()
        cut = rng.randint(3, full.index(" The answer is") - 1)
        response = full[:cut].rstrip()
        return Example(problem, response, kind, [(0, len(response))])
    # wrong_number: one equation's result is off by a small amount, and everything after it follows from it.
    steps = problem.steps()
    wrong_at = rng.randrange(len(steps))
    x, op, y, r = steps[wrong_at]
    wrong = r + rng.choice([d for d in range(-10, 11) if d != 0 and r + d >= 0])
    steps[wrong_at] = (x, op, y, wrong)
    if wrong_at == 0 and len(steps) == 2:
        _, op2, y2, _ = steps[1]
        steps[1] = (wrong, op2, y2, wrong - y2)
    response = problem.solution(steps)
    correct = problem.solution()
    # The wrong numbers: the characters where the response differs from the correct solution, per number.
    spans = [m.span() for m in NUMBER.finditer(response)]
    right = [m.group() for m in NUMBER.finditer(correct)]
    bad = [span for span, good in zip(spans, right) if response[span[0]:span[1]] != good]
    return Example(problem, response, kind, bad)


def make_sft_set(problems: list[Problem], noise: float, rng: random.Random) -> list[Example]:
    """The SFT examples of ``problems``: a share ``noise`` corrupted, the kinds in equal turns."""
    n_bad = round(noise * len(problems))
    bad = set(rng.sample(range(len(problems)), n_bad))
    kinds = [CORRUPTIONS[i % len(CORRUPTIONS)] for i in range(n_bad)]
    rng.shuffle(kinds)
    out, k = [], 0
    for i, problem in enumerate(problems):
        if i in bad:
            other = problems[(i + 1 + rng.randrange(len(problems) - 1)) % len(problems)]
            out.append(corrupt(problem, kinds[k], rng, other))
            k += 1
        else:
            out.append(Example(problem, problem.solution()))
    return out


def final_answer(text: str) -> int | None:
    """The graded number of a response: after the last ``The answer is``, else its last number."""
    found = ANSWER.findall(text) or NUMBER.findall(text)
    if not found:
        return None
    try:
        return int(found[-1].replace(",", ""))
    except ValueError:
        return None

"""The real-model quality track's data (`benchmarks/quality/mathdata.py`): problems, corruptions, grading.

The references are hand computations: the arithmetic of each template, read back from the text.
"""

from __future__ import annotations

import importlib.util
import random
import re
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.env_independent  # the quality benchmark's data, Python only: `make test` only

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "quality" / "mathdata.py"
spec = importlib.util.spec_from_file_location("mathdata", PATH)
mathdata = importlib.util.module_from_spec(spec)
sys.modules["mathdata"] = mathdata  # dataclasses look their module up there
spec.loader.exec_module(mathdata)

EQUATION = re.compile(r"(-?\d+) ([-+*/]) (\d+) = (-?\d+)\.")


def true_value(x: int, op: str, y: int) -> int:
    return {"+": x + y, "-": x - y, "*": x * y, "/": x // y}[op]


def problems(n: int = 400, seed: int = 0):
    return mathdata.draw_problems(random.Random(seed), n, set())


def test_clean_solutions_are_right_and_end_with_the_answer():
    for p in problems():
        equations = EQUATION.findall(p.solution())
        assert equations, p.solution()
        for x, op, y, result in equations:
            assert true_value(int(x), op, int(y)) == int(result), p.solution()
            if op == "/":
                assert int(x) % int(y) == 0, p.solution()
        assert int(equations[-1][3]) == p.answer >= 0
        assert p.solution().endswith(f"The answer is {p.answer}.")
        assert mathdata.final_answer(p.solution()) == p.answer
        for number in re.findall(r"\d+", p.question):  # the question states the numbers it uses
            assert number in " ".join(str(n) for n in p.numbers), (p.question, p.numbers)


def test_every_template_is_drawn_and_splits_share_no_problem():
    used: set = set()
    a = mathdata.draw_problems(random.Random(1), 300, used)
    b = mathdata.draw_problems(random.Random(2), 300, used)
    assert not {p.key for p in a} & {p.key for p in b}
    assert {p.template for p in a} == set(range(len(mathdata.TEMPLATES)))


def test_make_sft_set_corrupts_the_asked_share_in_equal_kinds():
    ps = problems(200)
    examples = mathdata.make_sft_set(ps, 0.3, random.Random(0))
    kinds = [e.kind for e in examples]
    assert kinds.count("clean") == 140
    assert sorted(kinds.count(k) for k in mathdata.CORRUPTIONS) == [15, 15, 15, 15]
    assert [e.problem for e in examples] == ps
    assert all(e.response == e.problem.solution() and not e.bad_spans for e in examples if e.kind == "clean")
    assert mathdata.make_sft_set(ps, 0.0, random.Random(0)) == [mathdata.Example(p, p.solution()) for p in ps]


@pytest.mark.parametrize("kind", mathdata.CORRUPTIONS)
def test_each_corruption_gives_a_wrong_response_and_marks_what_is_wrong(kind):
    rng = random.Random(3)
    ps = problems(200)
    for i, p in enumerate(ps):
        other = ps[(i + 1) % len(ps)]
        e = mathdata.corrupt(p, kind, rng, other)
        assert e.kind == kind and e.problem == p
        if kind in ("wrong_number", "off_topic"):
            assert mathdata.final_answer(e.response) != p.answer, e.response
        if kind == "wrong_number":
            equations = EQUATION.findall(e.response)
            wrong = [eq for eq in equations if true_value(int(eq[0]), eq[1], int(eq[2])) != int(eq[3])]
            assert len(wrong) == 1, e.response  # one slip; what follows is computed from it
            assert len(equations) == len(p.steps()) and e.response.endswith(f"The answer is {equations[-1][3]}.")
            marked = {e.response[a:b] for a, b in e.bad_spans}
            assert wrong[0][3] in marked and equations[-1][3] in marked, (e.response, e.bad_spans)
            assert all(e.response[a:b].lstrip("-").isdigit() for a, b in e.bad_spans)
        else:
            assert e.bad_spans == [(0, len(e.response))]
        if kind == "truncated":
            assert p.solution().startswith(e.response) and "The answer is" not in e.response
        if kind == "mismatched":
            assert e.response == other.solution()
        if kind == "off_topic":
            assert e.response in mathdata.OFF_TOPIC


def test_final_answer_reads_the_last_stated_answer_else_the_last_number():
    assert mathdata.final_answer("3 + 4 = 7. The answer is 7.") == 7
    assert mathdata.final_answer("#### 12\nThe answer is: 1,200") == 1200
    assert mathdata.final_answer("So there are 5 left, then 9") == 9
    assert mathdata.final_answer("no number here") is None

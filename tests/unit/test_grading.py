"""Graders: tricky MATH answers, GSM8K commas and negatives, arith, and unknown tasks."""
from __future__ import annotations

import pytest

from stepwise.tasks.answers import last_boxed
from stepwise.tasks.grading import grade


@pytest.mark.parametrize("predicted, reference", [
    (r"\frac12", r"\dfrac{1}{2}"),
    ("0.5", r"\frac{1}{2}"),
    (r"10\text{ cm}", "10"),
    (r"(1,2]", r"(1, 2]"),
    (r"\text{(A)}", "A"),
    (r"2\sqrt{3}", r"\sqrt{12}"),
    ("x=3", "3"),
    (r"90^\circ", "90"),
    (r"\left(3, \frac{\pi}{2}\right)", r"\left( 3, \frac{\pi}{2} \right)"),
])
def test_math_equivalent_answers(predicted, reference):
    assert grade("math", f"So the answer is $\\boxed{{{predicted}}}$.", reference)


@pytest.mark.parametrize("predicted, reference", [
    ("3", "4"), (r"(1,2]", r"(1,2)"), (r"\frac{1}{3}", "0.5"), ("-2", "2"),
])
def test_math_wrong_answers(predicted, reference):
    assert not grade("math", f"\\boxed{{{predicted}}}", reference)


def test_math_needs_a_boxed_answer_and_reads_the_last_one():
    assert not grade("math", "The answer is 5.", "5")
    assert grade("math", r"first \boxed{4}, finally \boxed{5}", "5")
    assert grade("math", r"\boxed{5}", r"Solution ... so $\boxed{5}$.")
    assert last_boxed(r"\boxed{\frac{a}{b}}") == r"\frac{a}{b}" and last_boxed(r"\boxed 7") == "7"
    assert last_boxed(r"\fbox{9}") == "9"


def test_math_never_raises_on_weird_input():
    assert not grade("math", r"\boxed{\frac{", "1")
    assert not grade("math", "", "")


@pytest.mark.parametrize("response, reference, expected", [
    ("so 1,000 in total\n#### 1,000", "#### 1000", True),
    ("#### $1,000.", "1000", True),
    ("#### -7", "Natalia ... #### -7", True),
    ("#### 3.0", "3", True),
    ("#### 7", "#### -7", False),
    ("The answer is 7", "7", False),
])
def test_gsm8k(response, reference, expected):
    assert grade("gsm8k", response, reference) is expected


def test_arith_and_unknown_task():
    assert grade("arith", "3+4=7\n7*2=4\nA: 4", "4")
    assert not grade("arith", "A: 5", "4")
    with pytest.raises(ValueError, match="valid: \\['arith', 'gsm8k', 'math'\\]"):
        grade("code", "x", "y")

"""Graders: tricky MATH answers (by math-verify and by the string fallback alone), GSM8K commas and
negatives, arith, weird input, threads and SIGALRM timers, and unknown tasks."""
from __future__ import annotations

import signal
import threading

import pytest

from stepwise.tasks import grading
from stepwise.tasks.answers import last_boxed
from stepwise.tasks.grading import grade
from stepwise.tasks.math_answers import math_answers_match, normalise_math_answer

EQUIVALENT = [
    (r"\frac12", r"\dfrac{1}{2}"),
    ("0.5", r"\frac{1}{2}"),
    (r"\tfrac{3}{4}", "0.75"),
    (r"10\text{ cm}", "10"),
    (r"12\text{ inches}^2", "12"),
    (r"(1,2]", r"(1, 2]"),
    (r"\text{(A)}", "A"),
    (r"\textbf{(C)}", "(C)"),
    ("x=3", "3"),
    (r"90^\circ", "90"),
    (r"\$5", "5"),
    ("1,000", "1000"),
    (r"1\!000", "1000"),
    ("5.", "5"),
    (r"10\%", "10"),
    (r"\frac{\sqrt3}{2}", r"\dfrac{\sqrt{3}}{2}"),
    (r"\left(3, \frac{\pi}{2}\right)", r"\left( 3, \frac{\pi}{2} \right)"),
    (r"\text{Monday}", "Monday"),
]
SYMBOLIC_ONLY = [(r"2\sqrt{3}", r"\sqrt{12}"), (r"\{1,2\}", r"\{2,1\}"), ("x^2+2x", "2x+x^2")]
DIFFERENT = [("3", "4"), (r"(1,2]", r"(1,2)"), (r"\frac{1}{3}", "0.5"), ("-2", "2"), (r"\text{(A)}", "B"),
             (r"\sqrt{2}", "2"), ("0.333", r"\frac13"), (r"10\text{ cm}", "100"), ("12", "1,2")]


@pytest.mark.parametrize("predicted, reference", EQUIVALENT + SYMBOLIC_ONLY)
def test_math_equivalent_answers(predicted, reference):
    assert grade("math", f"So the answer is $\\boxed{{{predicted}}}$.", reference)


@pytest.mark.parametrize("predicted, reference", EQUIVALENT)
def test_math_fallback_alone_handles_the_common_forms(monkeypatch, predicted, reference):
    monkeypatch.setattr(grading, "_math_verify_equal", lambda gold, predicted: False)
    assert grade("math", f"\\boxed{{{predicted}}}", reference)
    assert math_answers_match(reference, predicted)


@pytest.mark.parametrize("predicted, reference", DIFFERENT)
def test_math_wrong_answers(predicted, reference):
    assert not grade("math", f"\\boxed{{{predicted}}}", reference)
    assert not math_answers_match(predicted, reference)


def test_math_verify_raising_falls_back(monkeypatch):
    import math_verify

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(math_verify, "parse", broken)
    assert grade("math", r"\boxed{\dfrac{1}{2}}", "0.5")
    assert not grade("math", r"\boxed{\dfrac{1}{2}}", "0.6")


def test_math_needs_a_boxed_answer_and_reads_the_last_one():
    assert not grade("math", "The answer is 5.", "5")
    assert grade("math", r"first \boxed{4}, finally \boxed{5}", "5")
    assert not grade("math", r"first \boxed{5}, finally \boxed{4}", "5")
    assert grade("math", r"\boxed{5}", r"Solution ... so $\boxed{5}$.")
    assert grade("math", r"\fbox{\frac{1}{2}}", "0.5")
    assert last_boxed(r"\boxed{\frac{a}{b}}") == r"\frac{a}{b}" and last_boxed(r"\boxed 7") == "7"


@pytest.mark.parametrize("response, reference", [
    (r"\boxed{\frac{", "1"), ("", ""), (r"\boxed{}", ""), (r"\boxed{ }", " "), (r"\boxed{\sqrt{}^{}}", "}{"),
    (r"\boxed{" + "(" * 300 + "}", "1"), (r"\boxed{1}", r"\boxed{"), (None, "1"), (r"\boxed{1}", None),
    (r"\boxed{\begin{pmatrix}}", r"\end{pmatrix}"), ("\\boxed{\x00\u2212}", "\u2212"),
])
def test_math_never_raises_on_weird_input(response, reference):
    assert grade("math", response, reference) is False


def test_math_in_a_worker_thread_still_uses_math_verify():
    results = []
    worker = threading.Thread(target=lambda: results.append(grade("math", r"\boxed{2\sqrt{3}}", r"\sqrt{12}")))
    worker.start()
    worker.join(60)
    assert results == [True]


def test_an_outer_sigalrm_timer_survives_math_verify():
    previous_handler = signal.getsignal(signal.SIGALRM)
    previous_timer = signal.setitimer(signal.ITIMER_REAL, 300.0)
    try:
        assert grade("math", r"\boxed{\frac12}", "0.5")
        assert 250 < signal.getitimer(signal.ITIMER_REAL)[0] <= 300
    finally:
        signal.setitimer(signal.ITIMER_REAL, *previous_timer)
        signal.signal(signal.SIGALRM, previous_handler)


def test_normalisation_keeps_escaped_backslashes_and_commands_intact():
    assert normalise_math_answer(r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}") == r"\begin{pmatrix}1\\2\end{pmatrix}"
    assert normalise_math_answer(r"x \rightarrow 3") == r"x\rightarrow3"


@pytest.mark.parametrize("response, reference, expected", [
    ("so 1,000 in total\n#### 1,000", "#### 1000", True),
    ("#### $1,000.", "1000", True),
    ("#### 1000", "$1,000", True),
    ("#### -7", "Natalia ... #### -7", True),
    ("#### 3.0", "3", True),
    ("#### 2.50", "2.5", True),
    ("#### 18 dollars", "18", True),
    ("#### 12\n#### 13", "13", True),
    ("#### 7", "#### -7", False),
    ("#### 1,000", "100", False),
    ("#### 12", "13", False),
    ("The answer is 7", "7", False),
    ("####", "7", False),
    ("#### 7", "no number here", False),
])
def test_gsm8k(response, reference, expected):
    assert grade("gsm8k", response, reference) is expected


def test_arith_and_unknown_task():
    assert grade("arith", "3+4=7\n7*2=4\nA: 4", "4")
    assert grade("gsm8k", "#### 42", 42) and grade("arith", "A: 4", 4)
    assert not grade("arith", "A: 5", "4")
    with pytest.raises(ValueError, match="valid: \\['arith', 'code', 'gsm8k', 'math'\\]"):
        grade("chess", "x", "y")

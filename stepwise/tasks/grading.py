"""One grading entry point: `grade(task, response, reference) -> bool` for "math", "gsm8k", "arith".

math: the response's last `\\boxed{}` against the reference's (or the bare reference), by
math-verify (answers wrapped as inline LaTeX) with a string-normalisation fallback; never raises.
gsm8k: numbers after the last `####`. arith: exact final answer line.
"""
from __future__ import annotations

from typing import Callable

from stepwise.tasks.answers import gsm8k_answer, last_boxed, normalise_latex, numbers_equal


def _arith(response: str, reference: str) -> bool:
    from stepwise.tasks.arith import grade_arith

    return grade_arith(response, reference)


def _gsm8k(response: str, reference: str) -> bool:
    predicted = gsm8k_answer(response)
    gold = gsm8k_answer(reference) if "####" in reference else reference.strip().replace(",", "")
    return predicted is not None and gold is not None and numbers_equal(predicted, gold)


def _math(response: str, reference: str) -> bool:
    predicted = last_boxed(response)
    if predicted is None:
        return False
    gold = last_boxed(reference) if "\\boxed" in reference or "\\fbox" in reference else reference
    if gold is None:
        return False
    try:
        from math_verify import parse, verify

        if verify(parse(f"${gold}$", parsing_timeout=5), parse(f"${predicted}$", parsing_timeout=5), timeout_seconds=5):
            return True
    except Exception:  # math-verify gives up on odd input; the string fallback decides
        pass
    return normalise_latex(predicted) == normalise_latex(gold)


GRADERS: dict[str, Callable[[str, str], bool]] = {"arith": _arith, "gsm8k": _gsm8k, "math": _math}


def grade(task: str, response: str, reference: str) -> bool:
    if task not in GRADERS:
        raise ValueError(f"no grader for task '{task}'; valid: {sorted(GRADERS)}")
    return GRADERS[task](response, reference)

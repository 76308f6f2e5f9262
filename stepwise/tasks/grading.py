"""One grading entry point: `grade(task, response, reference) -> bool` for "math", "gsm8k", "arith", "code".

math: the response's last `\\boxed{}` / `\\fbox{}` against the reference's last one (or the bare
reference), equal when math-verify says so (answers wrapped as inline LaTeX, guarded by its
timeouts) or when the string/number fallback of `math_answers` matches; never raises.
gsm8k: the number after the last `####` in the response against the reference's (a full GSM8K
solution or a bare number), compared by value. arith: exact final `A:` line. code: the response's
program run, sandboxed, against the test spec in the reference (a dict or its JSON; see
stepwise.tasks.code, which raises ValueError for a malformed spec).
"""
from __future__ import annotations

import json
import signal
import threading
import time
from typing import Callable

from stepwise.tasks.answers import gsm8k_answer, last_boxed, numbers_equal
from stepwise.tasks.math_answers import math_answers_match

MATH_VERIFY_TIMEOUT_S = 5  # per parse and per comparison


def _arith(response: str, reference: str) -> bool:
    from stepwise.tasks.arith import grade_arith

    return grade_arith(response, reference)


def _code(response: str, reference: str) -> bool:
    from stepwise.tasks.code import grade_code

    return grade_code(response, reference)


def _gsm8k(response: str, reference: str) -> bool:
    predicted = gsm8k_answer(response)
    gold = gsm8k_answer(reference if "####" in reference else f"#### {reference}")
    return predicted is not None and gold is not None and numbers_equal(predicted, gold)


def _math_verify_equal(gold: str, predicted: str) -> bool:
    """math-verify's verdict; False when it raises or times out.

    Its timeouts use SIGALRM, which works only in the main thread (elsewhere they run unguarded);
    an outer SIGALRM timer (e.g. pytest-timeout) that it would cancel is re-armed afterwards.
    """
    try:
        from math_verify import parse, verify
    except ImportError:
        return False
    in_main = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
    limit = MATH_VERIFY_TIMEOUT_S if in_main else None
    outer = signal.getitimer(signal.ITIMER_REAL) if in_main else (0.0, 0.0)
    started = time.monotonic()
    try:
        return bool(verify(parse(f"${gold}$", parsing_timeout=limit), parse(f"${predicted}$", parsing_timeout=limit),
                           timeout_seconds=limit))
    except Exception:  # math-verify gives up on odd input; the fallback decides
        return False
    finally:
        if outer[0] > 0:
            signal.setitimer(signal.ITIMER_REAL, max(outer[0] - (time.monotonic() - started), 1e-3), outer[1])


def _math(response: str, reference: str) -> bool:
    predicted = last_boxed(response)
    if predicted is None or not predicted.strip():
        return False
    gold = last_boxed(reference) if "\\boxed" in reference or "\\fbox" in reference else reference
    if gold is None or not gold.strip():
        return False
    return _math_verify_equal(gold, predicted) or math_answers_match(predicted, gold)


GRADERS: dict[str, Callable[[str, str], bool]] = {"arith": _arith, "code": _code, "gsm8k": _gsm8k, "math": _math}


def grade(task: str, response: str, reference: str) -> bool:
    """Whether `response` reaches `reference` on `task`; ValueError for an unknown task or a bad code spec."""
    if task not in GRADERS:
        raise ValueError(f"no grader for task '{task}'; valid: {sorted(GRADERS)}")
    if isinstance(reference, (int, float)) and not isinstance(reference, bool):
        reference = str(reference)
    if isinstance(reference, dict):  # a code test spec
        reference = json.dumps(reference)
    if not isinstance(response, str) or not isinstance(reference, str):
        return False
    return bool(GRADERS[task](response, reference))

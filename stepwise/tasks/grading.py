"""One grading entry point: `grade(task, response, reference) -> bool`."""
from __future__ import annotations

from typing import Callable


def _arith(response: str, reference: str) -> bool:
    from stepwise.tasks.arith import grade_arith

    return grade_arith(response, reference)


GRADERS: dict[str, Callable[[str, str], bool]] = {"arith": _arith}


def grade(task: str, response: str, reference: str) -> bool:
    if task not in GRADERS:
        raise ValueError(f"no grader for task '{task}'; valid: {sorted(GRADERS)}")
    return GRADERS[task](response, reference)

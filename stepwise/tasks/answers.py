"""Final-answer extraction for MATH (`\\boxed{}`) and GSM8K (`#### n`); MATH normalisation is in `math_answers`."""
from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` (balanced braces) or `\\boxed x`, else None."""
    start, command = max((text.rfind(command), command) for command in ("\\boxed", "\\fbox"))
    if start < 0:
        return None
    rest = text[start + len(command):]
    if rest.startswith(" ") and not rest.lstrip().startswith("{"):
        match = re.match(r"\s*([^\s$]+)", rest)
        return match.group(1) if match else None
    rest = rest.lstrip()
    if not rest.startswith("{"):
        return None
    depth = 0
    for index, char in enumerate(rest):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth == 0:
            return rest[1:index]
    return None


def gsm8k_answer(text: str) -> str | None:
    """The number after the last `####` (commas, `$`, units and a trailing `.` removed), else None."""
    if "####" not in text:
        return None
    match = _NUMBER.search(text.rsplit("####", 1)[1].replace("$", ""))
    return match.group(0).replace(",", "") if match else None


def numbers_equal(a: str, b: str) -> bool:
    try:
        return abs(float(a) - float(b)) < 1e-6 * max(1.0, abs(float(b)))
    except ValueError:
        return a == b

"""MATH answer comparison without a symbolic engine: the fallback the grader uses when math-verify
cannot decide (it raised, timed out, or said "different").

`normalise_math_answer` rewrites a LaTeX answer to a canonical string (no `\\left`/`\\right`,
`\\dfrac`/`\\tfrac` -> `\\frac`, `\\frac12` -> `\\frac{1}{2}`, trailing `\\text{ cm}` units, degrees,
dollars, percent, thin spaces, spaces, a trailing `.`, a leading `x=`, `(A)` -> `A`, thousands
commas); `math_answers_match` compares two answers by that string or, when both are plain numbers
or numeric fractions, by value.
"""
from __future__ import annotations

import re
from fractions import Fraction

# (pattern, replacement) pairs applied in order; `(?![a-zA-Z])` keeps `\right` from eating `\rightarrow`
_REWRITES = [
    (r"\\left(?![a-zA-Z])\.?", ""),
    (r"\\right(?![a-zA-Z])\.?", ""),
    (r"\\[dt]frac(?![a-zA-Z])", r"\\frac"),
    (r"(?<!\\)\\(?:!|,|;|:| )", ""),
    (r"~", ""),
    (r"\^\s*\{?\s*\\circ\s*\}?", ""),
    (r"\\circ(?![a-zA-Z])", ""),
    (r"\\?%", ""),
    (r"\\\$|\$", ""),
    (r"\\(?:displaystyle|textstyle)(?![a-zA-Z])", ""),
]
_TEXT = r"\\(?:text|textbf|textrm|mbox|mathrm|mathbf|operatorname)\s*\{([^{}]*)\}"
_UNIT_AT_END = re.compile(r"(?<=\S)\s*" + _TEXT.replace(r"([^{}]*)", r"\s*[a-zA-Z][a-zA-Z. ]*") + r"(?:\^\{?\d\}?)?$")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_NUMBER = re.compile(r"-?(?:\d+\.?\d*|\.\d+)")
_FRACTION = re.compile(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}|(-?\d+)/(-?\d+)")


def normalise_math_answer(answer: str) -> str:
    """A canonical string form of a MATH answer (see the module docstring); never raises."""
    if not isinstance(answer, str):
        return ""
    text = answer.strip()
    for pattern, replacement in _REWRITES:
        text = re.sub(pattern, replacement, text)
    text = _UNIT_AT_END.sub("", text.strip())  # "10\text{ cm}" -> "10", but "\text{(A)}" stays
    text = re.sub(_TEXT, r"\1", text)
    text = re.sub(r"\s+", "", text).rstrip(".")
    text = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", text)
    text = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", text)
    text = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", text)
    text = re.sub(r"\\sqrt(\d)", r"\\sqrt{\1}", text)
    text = re.sub(r"^[a-zA-Z]=(?=[^=]+$)", "", text)  # "x=3" -> "3"
    choice = re.fullmatch(r"\(([A-Ea-e])\)", text)
    if choice:
        text = choice.group(1).upper()
    if _THOUSANDS.fullmatch(text):
        text = text.replace(",", "")
    return text


def numeric_value(text: str) -> Fraction | None:
    """The exact value of a normalised plain number (`-2.50`) or numeric fraction (`\\frac{1}{2}`, `-3/4`)."""
    try:
        if _NUMBER.fullmatch(text):
            return Fraction(text)
        match = _FRACTION.fullmatch(text)
        if match is None:
            return None
        sign, numerator, denominator, plain_numerator, plain_denominator = match.groups()
        value = Fraction(int(numerator or plain_numerator), int(denominator or plain_denominator))
        return -value if sign else value
    except (ValueError, ZeroDivisionError):
        return None


def math_answers_match(predicted: str, reference: str) -> bool:
    """True when the two answers normalise to the same string or the same number."""
    left, right = normalise_math_answer(predicted), normalise_math_answer(reference)
    if not left or not right:
        return False
    if left == right:
        return True
    left_value, right_value = numeric_value(left), numeric_value(right)
    return left_value is not None and left_value == right_value

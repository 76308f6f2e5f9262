"""Markdown tables in the paper's layout: one row per model, one column per benchmark, each cell the
accuracy (math) or pass@1 (code) in percent with its 95% Wilson interval."""
from __future__ import annotations

from typing import Mapping, Sequence

from stepwise.data.benchmarks import FORMATS
from stepwise.evaluate.stats import Score


def cell(score: Score | None) -> str:
    """`45.0 (40.7–49.4)`: percent, one decimal, interval in parentheses; `–` when not run."""
    if score is None:
        return "–"
    return f"{100 * score.accuracy:.1f} ({100 * score.low:.1f}–{100 * score.high:.1f})"


def results_table(rows: Mapping[str, Mapping[str, Score]], benchmarks: Sequence[str]) -> str:
    """The table of `rows` (model label -> benchmark -> Score), columns in `benchmarks` order, and a
    note saying what the numbers are and how many problems each column has."""
    header = ["Model"] + [FORMATS[name].title for name in benchmarks]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + [":---:"] * len(benchmarks)) + "|"]
    for label, scores in rows.items():
        lines.append("| " + " | ".join([label] + [cell(scores.get(name)) for name in benchmarks]) + " |")
    counts = []
    for name in benchmarks:
        totals = sorted({scores[name].total for scores in rows.values() if name in scores})
        metric = "pass@1" if FORMATS[name].task == "code" else "accuracy"
        counts.append(f"{FORMATS[name].title} {metric}, n={'/'.join(map(str, totals)) or '–'}")
    note = ("Greedy zero-shot, % with 95% Wilson interval in parentheses; " + "; ".join(counts) + ".")
    return "\n".join(lines) + "\n\n" + note + "\n"

"""Run-to-run spread: greedy accuracy of each policy across runs of one recipe with different seeds.

    stepwise spread runs/a runs/b runs/c [--out spread.md]

reads each run's report.json and prints (and optionally writes) a table of mean, standard deviation,
and per-seed values, plus each policy's gain over `base` within the same run.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from stepwise.data.jsonl import atomic_write_text


def policy_accuracies(report: dict) -> dict[str, float]:
    rows = {}
    for stage in ("eval", "dapo_eval", "rs"):
        for name, value in report["stages"].get(stage, {}).items():
            if isinstance(value, dict) and "accuracy" in value:
                rows[name] = value["accuracy"]
    return rows


def spread_table(run_dirs: list[str | Path]) -> str:
    runs = []
    for run_dir in run_dirs:
        file = Path(run_dir) / "report.json"
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no report (run the recipe first)")
        runs.append((Path(run_dir).name, policy_accuracies(json.loads(file.read_text()))))
    names = sorted({n for _, rows in runs for n in rows}, key=lambda n: (n != "base", n))
    lines = ["| policy | mean | std | " + " | ".join(r for r, _ in runs) + " |",
             "|---|---|---|" + "---|" * len(runs)]
    for name in names + [f"{n} - base" for n in names if n != "base"]:
        policy = name.split(" - ")[0]
        cells = [(rows[policy] - rows["base"] if " - " in name else rows[policy])
                 if policy in rows and "base" in rows else None for _, rows in runs]
        values = [v for v in cells if v is not None]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        lines.append(f"| {name} | {statistics.mean(values):.3f} | {std:.3f} | "
                     + " | ".join("-" if v is None else f"{v:.3f}" for v in cells) + " |")
    return "\n".join(lines) + "\n"


def main(run_dirs: list[str], out: str | None) -> int:
    table = spread_table(run_dirs)
    print(table)
    if out:
        atomic_write_text(out, "# Run-to-run spread\n\n" + table)
    return 0

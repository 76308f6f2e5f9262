"""Run-to-run spread: greedy accuracy of each policy across runs of one recipe with different seeds.

    stepwise spread runs/a runs/b runs/c [--out spread.md]

reads each run's report.json and prints (and optionally writes) a table of mean, standard deviation,
and per-seed values, plus each policy's gain over `base` within the same run. A recipe with
`run.seeds` writes the same table as its top-level report (see `stepwise.pipeline.seeds`).
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from stepwise.data.jsonl import atomic_write_text


def policy_accuracies(report: dict) -> dict[str, float]:
    from stepwise.pipeline.stages.report import accuracy_rows

    return {name: row["accuracy"] for name, row in accuracy_rows(report).items()}


def read_runs(run_dirs: list[str | Path]) -> dict[str, dict[str, float]]:
    """{run name: {policy: accuracy}} from each run's report.json."""
    runs = {}
    for run_dir in run_dirs:
        file = Path(run_dir) / "report.json"
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no report (run the recipe first)")
        runs[Path(run_dir).name] = policy_accuracies(json.loads(file.read_text()))
    return runs


def spread_rows(runs: dict[str, dict[str, float]]) -> dict[str, dict]:
    """Per policy and per gain over base (`<policy> - base`): mean, std (n-1) and the per-run values."""
    names = sorted({n for rows in runs.values() for n in rows}, key=lambda n: (n != "base", n))
    out = {}
    for name in names + [f"{n} - base" for n in names if n != "base"]:
        policy = name.split(" - ")[0]
        cells = {run: (rows[policy] - rows["base"] if " - " in name else rows[policy])
                 for run, rows in runs.items() if policy in rows and (" - " not in name or "base" in rows)}
        values = list(cells.values())
        out[name] = {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                     "runs": cells}
    return out


def spread_table(runs: dict[str, dict[str, float]]) -> str:
    rows = spread_rows(runs)
    lines = ["| policy | mean | std | " + " | ".join(runs) + " |", "|---|---|---|" + "---|" * len(runs)]
    for name, row in rows.items():
        cells = [row["runs"].get(run) for run in runs]
        lines.append(f"| {name} | {row['mean']:.3f} | {row['std']:.3f} | "
                     + " | ".join("-" if v is None else f"{v:.3f}" for v in cells) + " |")
    return "\n".join(lines) + "\n"


def verdicts(rows: dict[str, dict]) -> list[str]:
    """One line per policy: its mean gain over base against the run-to-run spread (std of base and of the gain)."""
    base_std = rows.get("base", {}).get("std", 0.0)
    lines = []
    for name, row in rows.items():
        if " - base" not in name or len(row["runs"]) < 2:
            continue
        spread = max(base_std, row["std"])
        word = "larger" if abs(row["mean"]) > spread else "not larger"
        lines.append(f"- {name}: {row['mean']:+.3f} (mean over {len(row['runs'])} seeds); run-to-run std "
                     f"{spread:.3f} (max of base {base_std:.3f} and of the gain {row['std']:.3f}): {word} than the spread")
    return lines


def main(run_dirs: list[str], out: str | None) -> int:
    table = spread_table(read_runs(run_dirs))
    print(table)
    if out:
        atomic_write_text(out, "# Run-to-run spread\n\n" + table)
    return 0

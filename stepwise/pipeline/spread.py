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


# pi0, rejection sampling (Skywork DAPO's, DQO's), and Skywork DAPO without its critic (MC values: what the critic adds)
REFERENCES = ("base", "rs_same_steps", "rs_baseline", "mc_same_steps")


def spread_rows(runs: dict[str, dict[str, float]]) -> dict[str, dict]:
    """Per policy and per gain over each reference present (`<policy> - base`, `<policy> - rs_...`): mean,
    std (n-1) and the per-run values; a gain is taken within each run."""
    names = sorted({n for rows in runs.values() for n in rows}, key=lambda n: (n != "base", n))
    gains = []
    for ref in [r for r in REFERENCES if r in names]:
        gains += [(n, ref) for n in names if n not in ("base", ref) and (ref, n) not in gains]  # a pair once
    out = {}
    for name, ref in [(n, None) for n in names] + gains:
        cells = {run: rows[name] - rows[ref] if ref else rows[name]
                 for run, rows in runs.items() if name in rows and (ref is None or ref in rows)}
        values = list(cells.values())
        out[f"{name} - {ref}" if ref else name] = {"mean": statistics.mean(values),
                                                   "std": statistics.stdev(values) if len(values) > 1 else 0.0,
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
    """One line per gain (over base, over RS): its mean against the run-to-run spread (the larger of the
    reference's std and the gain's std)."""
    lines = []
    for name, row in rows.items():
        if " - " not in name or len(row["runs"]) < 2:
            continue
        ref = name.split(" - ")[1]
        ref_std = rows.get(ref, {}).get("std", 0.0)
        spread = max(ref_std, row["std"])
        word = "larger" if abs(row["mean"]) > spread else "not larger"
        lines.append(f"- {name}: {row['mean']:+.3f} (mean over {len(row['runs'])} seeds); run-to-run std "
                     f"{spread:.3f} (max of {ref} {ref_std:.3f} and of the gain {row['std']:.3f}): {word} than the spread")
    return lines


def main(run_dirs: list[str], out: str | None) -> int:
    table = spread_table(read_runs(run_dirs))
    print(table)
    if out:
        atomic_write_text(out, "# Run-to-run spread\n\n" + table)
    return 0

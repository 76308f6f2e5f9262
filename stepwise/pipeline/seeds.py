"""A recipe with `run.seeds: [s1, s2, ...]`: the whole pipeline once per seed, each in
`<run.dir>/seed_<s>` (resumable like any run), then a top-level `report.md` / `report.json` with the
run-to-run spread of every policy's greedy accuracy and of its gain over the base policy."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from stepwise.config.schema import RecipeConfig
from stepwise.data.jsonl import atomic_write_json, atomic_write_text
from stepwise.pipeline.spread import read_runs, spread_rows, spread_table, verdicts


def seed_config(config: RecipeConfig, seed: int) -> RecipeConfig:
    return replace(config, run=replace(config.run, seed=seed, seeds=[], dir=str(Path(config.run.dir) / f"seed_{seed}")))


def run_seeds(config: RecipeConfig, only: list[str] | None = None, force: bool = False) -> Path:
    """Run every seed, write the spread report; returns its path."""
    from stepwise.pipeline.runner import run_pipeline

    run_dirs = []
    for index, seed in enumerate(config.run.seeds, 1):
        one = seed_config(config, seed)
        print(f"[stepwise] seed {seed} ({index}/{len(config.run.seeds)}): {one.run.dir}", flush=True)
        run_pipeline(one, only, force)
        run_dirs.append(one.run.dir)
    return write_spread_report(config, run_dirs)


def write_spread_report(config: RecipeConfig, run_dirs: list[str]) -> Path:
    runs = read_runs(run_dirs)
    rows = spread_rows(runs)
    out = Path(config.run.dir)
    lines = [f"# stepwise report: {config.run.name} over {len(runs)} seeds", "",
             "Greedy accuracy on held-out problems per seed; `<policy> - base` is the gain within one run.", "",
             spread_table(runs), "## Gain against the run-to-run spread", "", *verdicts(rows), "",
             "## Per-seed reports", ""]
    lines += [f"- `{Path(d).name}`: {Path(d) / 'report.md'}" for d in run_dirs]
    atomic_write_json(out / "report.json", json.loads(json.dumps(
        {"run": config.run.name, "seeds": list(config.run.seeds), "runs": run_dirs, "spread": rows})))
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    return out / "report.md"

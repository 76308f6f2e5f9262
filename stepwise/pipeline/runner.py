"""Run a recipe's stages in order, skipping those whose manifest key matches.

A stage whose manifest exists under another key (config or inputs changed) starts from an empty
directory; a stage without a manifest (killed midway) keeps its partial outputs to resume from.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from stepwise.config import to_yaml
from stepwise.config.schema import RecipeConfig
from stepwise.data.jsonl import atomic_write_text
from stepwise.pipeline import manifest, registry
from stepwise.pipeline.context import StageContext

DEFAULT_STAGES = ["data", "tokenizer", "init", "sft", "export", "sample", "grade", "eval", "report"]


def stage_names(config: RecipeConfig) -> list[str]:
    from stepwise.pipeline import stages  # noqa: F401  (registers the built-in stages)

    names = list(config.run.stages) or DEFAULT_STAGES
    for name in names:
        registry.get(name)
    return names


def run_pipeline(config: RecipeConfig, only: list[str] | None = None, force: bool = False) -> StageContext:
    """Run (or skip) each stage; returns the context with every stage's summary."""
    run_dir = Path(config.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(config=config, run_dir=run_dir)
    atomic_write_text(ctx.resolved_recipe, to_yaml(config))
    keys: dict[str, str] = {}
    for name in stage_names(config):
        stage = registry.get(name)
        depends = list(keys) if stage.depends == ("*",) else stage.depends
        inputs = {dep: keys[dep] for dep in depends if dep in keys}
        key = manifest.stage_key(name, config, stage.config_keys, inputs)
        keys[name] = key
        previous = manifest.read(run_dir / name)
        selected = only is None or name in only
        if previous is not None and previous.get("key") == key and not (force and selected):
            print(f"[stepwise] {name}: up to date, skipped", flush=True)
            ctx.summaries[name] = previous["summary"]
            continue
        if not selected:
            raise RuntimeError(f"stage '{name}' is out of date but not selected; run it first")
        if previous is not None:  # finished under another config or inputs: its outputs are stale
            shutil.rmtree(run_dir / name, ignore_errors=True)
        print(f"[stepwise] {name}: running", flush=True)
        began = time.perf_counter()
        summary = stage.run(ctx) or {}
        manifest.write(run_dir / name, name, key, summary, time.perf_counter() - began)
        ctx.summaries[name] = summary
        print(f"[stepwise] {name}: done in {time.perf_counter() - began:.1f}s", flush=True)
    return ctx

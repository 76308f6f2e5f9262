"""Run a recipe's stages in order, skipping those whose manifest key matches.

With `skywork_dapo.iterations: N > 1`, the iterative stages (sample ... dapo_eval) run again for
iterations 2..N right after iteration 1's, each iteration's key chained to the previous one's.
A stage whose manifest exists under another key (config or inputs changed) starts from an empty
directory; a stage without a manifest (killed midway) keeps its partial outputs to resume from.
"""
from __future__ import annotations

import shutil
import signal
import threading
import time
from pathlib import Path

from stepwise.config import to_yaml
from stepwise.config.schema import RecipeConfig
from stepwise.data.jsonl import atomic_write_text
from stepwise.pipeline import manifest, registry
from stepwise.pipeline.context import StageContext
from stepwise.train.guard import STOP_SIGNALS, Requeue

DEFAULT_STAGES = ["data", "tokenizer", "init", "sft", "export", "sample", "grade", "eval", "report"]


def stage_names(config: RecipeConfig) -> list[str]:
    from stepwise.pipeline import stages  # noqa: F401  (registers the built-in stages)

    names = list(config.run.stages) or DEFAULT_STAGES
    for name in names:
        registry.get(name)
    return names


def stage_plan(config: RecipeConfig) -> list[tuple[str, int]]:
    """(stage, iteration) in run order: iterations 2..N of the iterative stages follow iteration 1's."""
    names = stage_names(config)
    iterative = [n for n in names if registry.get(n).iterative]
    plan = [(name, 1) for name in names]
    if iterative:
        after = max(names.index(n) for n in iterative) + 1
        repeats = [(n, k) for k in range(2, config.skywork_dapo.iterations + 1) for n in iterative]
        plan = plan[:after] + repeats + plan[after:]
    return plan


def label(name: str, iteration: int) -> str:
    return name if iteration == 1 else f"iteration_{iteration}/{name}"


def _inputs(name: str, iteration: int, keys: dict[tuple[str, int], str]) -> dict[str, str]:
    """Keys of what stage `name` at `iteration` reads: its dependencies (same iteration when iterative)
    and, past iteration 1, the previous iteration's last stage (its policy is pi_ref now)."""
    stage = registry.get(name)
    if stage.depends == ("*",):
        return {label(*instance): key for instance, key in keys.items()}
    inputs = {}
    for dep in stage.depends:
        at = iteration if registry.get(dep).iterative else 1
        if (dep, at) in keys:
            inputs[dep] = keys[(dep, at)]
    if stage.iterative and iteration > 1:
        last = [instance for instance in keys if instance[1] == iteration - 1][-1]
        inputs["previous_iteration"] = keys[last]
    return inputs


class StopRequest:
    """SIGUSR1 / SIGTERM to the driver (Slurm's time-limit warning): the running step is told by the
    launcher, and the driver starts no further stage; it raises `Requeue` at the next stage boundary."""

    def __init__(self) -> None:
        self.received: int | None = None
        if threading.current_thread() is threading.main_thread():
            for number in STOP_SIGNALS:
                signal.signal(number, self)

    def __call__(self, number, frame) -> None:
        self.received = number

    def check(self, title: str) -> None:
        if self.received is not None:
            raise Requeue(f"{signal.Signals(self.received).name} received; stopped before stage '{title}'")


def run_pipeline(config: RecipeConfig, only: list[str] | None = None, force: bool = False) -> StageContext:
    """Run (or skip) each stage; returns the context with every stage's summary."""
    stop = StopRequest()
    run_dir = Path(config.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    root = StageContext(config=config, run_dir=run_dir)
    atomic_write_text(root.resolved_recipe, to_yaml(config))
    keys: dict[tuple[str, int], str] = {}
    for name, iteration in stage_plan(config):
        stage, ctx, title = registry.get(name), root.at(iteration), label(name, iteration)
        key = manifest.stage_key(name, config, stage.config_keys, _inputs(name, iteration, keys))
        keys[(name, iteration)] = key
        where = ctx.path(name)
        previous = manifest.read(where, run_dir)
        selected = only is None or name in only
        if previous is not None and previous.get("key") == key and not (force and selected):
            print(f"[stepwise] {title}: up to date, skipped", flush=True)
            ctx.summaries[where] = previous["summary"]
            continue
        if not selected:
            raise RuntimeError(f"stage '{title}' is out of date but not selected; run it first")
        if previous is not None:  # finished under another config or inputs: its outputs are stale
            shutil.rmtree(where, ignore_errors=True)
        stop.check(title)
        print(f"[stepwise] {title}: running", flush=True)
        began = time.perf_counter()
        summary = stage.run(ctx) or {}
        manifest.write(where, run_dir, name, key, summary, time.perf_counter() - began)
        ctx.summaries[where] = summary
        print(f"[stepwise] {title}: done in {time.perf_counter() - began:.1f}s", flush=True)
    return root

"""Run the heavy part of a stage as a launched step, so that `stepwise run` only coordinates.

The driver calls `in_step(ctx, function, layout, **kwargs)`: it writes the request (the function's
`module:qualname`, the iteration and the JSON keyword arguments) into the stage's directory and
launches `python -m stepwise.pipeline.step REQUEST` with the layout's launcher (a plain process for
one worker on one node, torchrun for several, srun inside a Slurm allocation). Every worker rebuilds
the stage's context from the run directory, with its own `rank` / `world_size` (data-parallel work
splits by them), and calls `function(ctx, **kwargs)`; after all ranks return, rank 0 writes the
function's result (a small JSON dict) atomically and the driver reads it back. The driver never
creates a process group, never loads a model and never holds a stage's per-sample data.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Callable

from stepwise.config.schema import ParallelConfig
from stepwise.data.jsonl import atomic_write_json
from stepwise.pipeline.context import RESOLVED_RECIPE, StageContext

STEPS_DIR = ".steps"


def single_worker(ctx: StageContext) -> ParallelConfig:
    """One worker on the first node, with the recipe's launcher: conversions, grading, data shaping."""
    return ParallelConfig(nproc_per_node=1, nnodes=1, launcher=ctx.config.parallel.launcher)


def all_workers(ctx: StageContext) -> ParallelConfig:
    """Every worker of the recipe's layout, on every node: conversions split by layer range."""
    layout = ctx.config.parallel
    return ParallelConfig(nproc_per_node=layout.nproc_per_node, nnodes=layout.nnodes, launcher=layout.launcher)


def replicas(ctx: StageContext) -> ParallelConfig:
    """Data-parallel sampling on every node of the recipe's layout: one replica per worker (HF backend), or
    one per tensor-parallel group of `sampling.tensor_parallel_size` GPUs (vLLM, which starts its own TP
    workers inside the replica's process)."""
    layout, sampling = ctx.config.parallel, ctx.config.sampling
    group = sampling.tensor_parallel_size if sampling.backend == "vllm" else 1
    if layout.nproc_per_node % group:
        raise ValueError(f"sampling.tensor_parallel_size={group} does not divide parallel.nproc_per_node="
                         f"{layout.nproc_per_node}: a sampler replica must sit on one node")
    return replace(all_workers(ctx), nproc_per_node=layout.nproc_per_node // group)


def in_step(ctx: StageContext, function: Callable, layout: ParallelConfig | None = None, **kwargs) -> dict:
    """Run `function(ctx, **kwargs)` on the workers of `layout` (default: one); rank 0's result."""
    from stepwise.pipeline.launch import launch

    name = f"{function.__module__}:{function.__qualname__}"
    steps = ctx.run_dir / STEPS_DIR
    steps.mkdir(parents=True, exist_ok=True)
    stem = f"iteration_{ctx.iteration}.{function.__module__.rsplit('.', 1)[-1]}.{function.__qualname__}"
    request, result = steps / f"{stem}.request.json", steps / f"{stem}.result.json"
    result.unlink(missing_ok=True)
    atomic_write_json(request, {"function": name, "run_dir": str(ctx.run_dir), "iteration": ctx.iteration,
                                "kwargs": kwargs, "result": str(result)})
    launch(layout or single_worker(ctx), "stepwise.pipeline.step", [str(request)], ctx.run_dir)
    if not result.is_file():
        raise RuntimeError(f"step {name} finished without writing its result {result}")
    return json.loads(result.read_text())


def _resolve(name: str) -> Callable:
    module, _, qualname = name.partition(":")
    target = importlib.import_module(module)
    for part in qualname.split("."):
        target = getattr(target, part)
    return target


def run_request(request_path: str | os.PathLike) -> None:
    """A worker's side of `in_step`."""
    from stepwise.config.loader import load_resolved
    from stepwise.parallel.runtime import exit_with_launcher, launch_env

    exit_with_launcher()  # a torchrun worker dies with its agent, even before it joins a process group
    request = json.loads(Path(request_path).read_text())
    run_dir = Path(request["run_dir"])
    config = load_resolved((run_dir / RESOLVED_RECIPE).read_text())
    rank, world_size, local_rank = launch_env()
    ctx = StageContext(config=config, run_dir=run_dir, iteration=request["iteration"], rank=rank,
                       world_size=world_size, local_rank=local_rank)
    result = _resolve(request["function"])(ctx, **request["kwargs"])
    ctx.barrier()  # every rank's files are written before rank 0 reports
    if rank == 0:
        atomic_write_json(request["result"], result or {})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("request", help="the request file written by in_step")
    run_request(parser.parse_args(argv).request)
    return 0


if __name__ == "__main__":
    sys.exit(main())

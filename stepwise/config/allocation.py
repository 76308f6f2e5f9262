"""Does a recipe's every worker layout fit the Slurm allocation it is about to run in?

`slurm/common.sh` runs this before anything starts, so a recipe written for 8 nodes x 8 GPUs fails
in seconds inside a 2-node job instead of after its first stages:

    python -m stepwise.config.allocation RECIPE [key=value ...] --nodes N --gpus-per-node G

exits 0 when every layout fits, else 2 with one line per misfit on stderr, naming the recipe, the
stage, the recipe keys and the allocation, e.g.

    recipe R: stage critic needs 8 nodes x 8 processes (critic.parallel.nnodes=8,
    critic.parallel.nproc_per_node=8) but the allocation has 2 nodes x 8 GPUs

The layouts are the recipe's `parallel` (every launched step without a layout of its own) and
`config.layout_for(section)` of each train section the run uses (its stage is in the run, or it has a
`parallel` of its own; `advantage` scores with the critic). Rules, per layout:
  - GPUs per node G > 0: nproc_per_node must equal G (one process per GPU) and nnodes <= N;
  - G = 0 (CPU): nnodes <= N;
  - nnodes > 1 needs parallel.launcher=srun (torchrun starts workers on one node only).
Loading the recipe validates it too (a missing model.path is reported the same way, exit 2).
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

from stepwise.config.schema import ParallelConfig, RecipeConfig
from stepwise.config.validate import TRAIN_SECTIONS

USES = {"advantage": ("critic", "policy")}  # stages that launch workers at another section's layout


@dataclass(frozen=True)
class Use:
    """A layout and who runs at it: `what` for people ("stage critic"), `key` the recipe key holding it."""

    what: str
    key: str
    layout: ParallelConfig
    plural: bool = False  # "stages a, b need" / "stage a needs"


def stage_names(config: RecipeConfig) -> list[str]:
    """The stages the run goes through (run.stages, else the pipeline's default list)."""
    if config.run.stages:
        return list(config.run.stages)
    try:
        from stepwise.pipeline.runner import DEFAULT_STAGES
    except ImportError:  # the pipeline is not importable here: every train section counts
        return list(TRAIN_SECTIONS)
    return list(DEFAULT_STAGES)


def layouts(config: RecipeConfig) -> list[Use]:
    """Each distinct layout source the run uses: the recipe's `parallel`, then the sections' own."""
    stages = stage_names(config)
    used = [s for s in TRAIN_SECTIONS if s in stages]
    for stage, sections in USES.items():
        if stage in stages:
            used += [s for s in sections if s not in used]
    used += [s for s in TRAIN_SECTIONS if s not in used and getattr(config, s).parallel is not None]
    shared = [s for s in used if getattr(config, s).parallel is None]
    if shared:
        what = ("stage " if len(shared) == 1 else "stages ") + ", ".join(shared)
    else:
        what = "the recipe's workers"
    found = [Use(what, "parallel", config.parallel, plural=len(shared) != 1)]
    found += [Use(f"stage {s}", f"{s}.parallel", config.layout_for(s))
              for s in TRAIN_SECTIONS if s in used and getattr(config, s).parallel is not None]
    return found


def misfits(config: RecipeConfig, nodes: int, gpus_per_node: int, recipe: str = "recipe") -> list[str]:
    """One message per layout that does not fit `nodes` x `gpus_per_node` (0: CPU); empty when all fit."""
    have = f"{nodes} node{'s' * (nodes != 1)} x {gpus_per_node} GPUs" if gpus_per_node > 0 \
        else f"{nodes} node{'s' * (nodes != 1)} (CPU, GPUS_PER_NODE=0)"
    messages = []
    for use in layouts(config):
        p = use.layout
        needs = (f"{use.what} need{'' if use.plural else 's'} {p.nnodes} node{'s' * (p.nnodes != 1)} "
                 f"x {p.nproc_per_node} process{'es' * (p.nproc_per_node != 1)} "
                 f"({use.key}.nnodes={p.nnodes}, {use.key}.nproc_per_node={p.nproc_per_node}")
        if p.nnodes > 1 and p.launcher != "srun":
            messages.append(f"recipe {recipe}: {needs}, {use.key}.launcher={p.launcher}) but more than one node "
                            f"needs {use.key}.launcher=srun")
        elif p.nnodes > nodes or (gpus_per_node > 0 and p.nproc_per_node != gpus_per_node):
            messages.append(f"recipe {recipe}: {needs}) but the allocation has {have}")
    return messages


def _default_int(name: str) -> int | None:
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stepwise.config.allocation",
                                     description="Check a recipe's layouts against a Slurm allocation.")
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="key=value recipe overrides")
    parser.add_argument("--nodes", type=int, default=_default_int("SLURM_JOB_NUM_NODES"),
                        help="nodes in the allocation (default: $SLURM_JOB_NUM_NODES)")
    parser.add_argument("--gpus-per-node", type=int, default=_default_int("GPUS_PER_NODE"),
                        help="GPUs per node, 0 for CPU (default: $GPUS_PER_NODE)")
    args = parser.parse_intermixed_args(argv)
    if args.nodes is None or args.nodes < 1:
        parser.error("--nodes N (>= 1) is required outside a Slurm job")
    if args.gpus_per_node is None or args.gpus_per_node < 0:
        parser.error("--gpus-per-node G (>= 0) is required when GPUS_PER_NODE is not set")
    from stepwise.config.loader import ConfigError, load_recipe

    try:
        config = load_recipe(args.recipe, args.overrides)
    except (ConfigError, FileNotFoundError, OSError) as error:
        print(f"cannot load the recipe: {error}", file=sys.stderr)
        return 2
    messages = misfits(config, args.nodes, args.gpus_per_node, args.recipe)
    for message in messages:
        print(message, file=sys.stderr)
    return 2 if messages else 0


if __name__ == "__main__":
    sys.exit(main())

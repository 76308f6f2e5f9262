"""What a stage sees: the resolved recipe, the run directory, its iteration and its neighbours' outputs.

Stages marked `iterative` run once per Skywork DAPO iteration: iteration 1 lives in `RUN/<stage>`,
iteration k > 1 in `RUN/iteration_<k>/<stage>`. `path`/`dir`/`summary` resolve a stage name to the
directory of the current iteration (iterative stages) or the run's single one (the others).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from stepwise.config.schema import RecipeConfig
from stepwise.pipeline import manifest

RESOLVED_RECIPE = "recipe.resolved.yaml"


def stage_path(run_dir: Path, name: str, iteration: int) -> Path:
    """Directory of stage `name` at `iteration` (only iterative stages have per-iteration directories)."""
    from stepwise.pipeline import registry

    if iteration == 1 or not registry.get(name).iterative:
        return run_dir / name
    return run_dir / f"iteration_{iteration}" / name


@dataclass
class StageContext:
    config: RecipeConfig
    run_dir: Path
    iteration: int = 1
    summaries: dict[Path, dict] = field(default_factory=dict)  # finished stages' manifest summaries, by dir
    rank: int = 0  # inside a launched step (stepwise.pipeline.step): this worker's place; the driver is 0 of 1
    world_size: int = 1
    local_rank: int = 0

    def at(self, iteration: int) -> "StageContext":
        """The same run seen from another iteration (summaries shared)."""
        return replace(self, iteration=iteration, summaries=self.summaries)

    def path(self, stage: str) -> Path:
        return stage_path(self.run_dir, stage, self.iteration)

    def dir(self, stage: str) -> Path:
        path = self.path(stage)
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def resolved_recipe(self) -> Path:
        return self.run_dir / RESOLVED_RECIPE

    def barrier(self) -> None:
        """Wait for every worker of the step (a gloo/NCCL group from the launcher's rendezvous)."""
        if self.world_size > 1:
            import torch.distributed as dist

            from stepwise.parallel.runtime import init_distributed

            init_distributed()
            dist.barrier()

    def summary(self, stage: str) -> dict:
        path = self.path(stage)
        if path not in self.summaries:
            found = manifest.read(path, self.run_dir)
            if found is None:
                raise RuntimeError(f"stage '{stage}' has not finished in {path.parent} (no manifest)")
            self.summaries[path] = found["summary"]
        return self.summaries[path]

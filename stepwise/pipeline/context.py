"""What a stage sees: the resolved recipe, the run directory and its neighbours' outputs."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from stepwise.config.schema import RecipeConfig
from stepwise.pipeline import manifest

RESOLVED_RECIPE = "recipe.resolved.yaml"


@dataclass
class StageContext:
    config: RecipeConfig
    run_dir: Path
    summaries: dict[str, dict] = field(default_factory=dict)  # finished stages' manifest summaries

    def dir(self, stage: str) -> Path:
        path = self.run_dir / stage
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def resolved_recipe(self) -> Path:
        return self.run_dir / RESOLVED_RECIPE

    def summary(self, stage: str) -> dict:
        if stage not in self.summaries:
            found = manifest.read(self.run_dir / stage)
            if found is None:
                raise RuntimeError(f"stage '{stage}' has not finished in {self.run_dir} (no manifest)")
            self.summaries[stage] = found["summary"]
        return self.summaries[stage]

"""Stage manifests store paths relative to the run directory: a moved run stays up to date and reads its
inputs from where it now is, never from the old location."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from stepwise.config import load_recipe
from stepwise.pipeline import manifest
from stepwise.pipeline.runner import run_pipeline

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "tiny" / "skywork_dapo_arith.yaml"


def test_paths_under_the_run_directory_round_trip_relative_and_others_stay_as_they_are(tmp_path):
    run, stage = tmp_path / "run", tmp_path / "run" / "sft"
    stage.mkdir(parents=True)
    summary = {"checkpoints": f"{run}/sft/checkpoints", "runs": [str(run), f"{run}x/other"],
               "nested": {"hf": "/models/qwen", "steps": 3}}
    assert manifest.write(stage, run, "sft", "k", summary, 1.0)["summary"] == summary
    stored = json.loads((stage / manifest.MANIFEST).read_text())["summary"]
    assert stored == {"checkpoints": "${run}/sft/checkpoints", "runs": ["${run}", f"{run}x/other"],
                      "nested": {"hf": "/models/qwen", "steps": 3}}
    moved = tmp_path / "elsewhere"
    assert manifest.read(stage, moved)["summary"]["checkpoints"] == f"{moved}/sft/checkpoints"


def test_a_moved_run_directory_skips_its_finished_stages_and_points_at_the_new_place(tmp_path, capsys):
    old, new = tmp_path / "old", tmp_path / "new"
    overrides = ["run.stages=[data, tokenizer]", "run.seeds=[]"]
    run_pipeline(load_recipe(RECIPE, [*overrides, f"run.dir={old}"]))
    shutil.move(old, new)
    capsys.readouterr()
    ctx = run_pipeline(load_recipe(RECIPE, [*overrides, f"run.dir={new}"]))
    assert capsys.readouterr().out.count("up to date, skipped") == 2
    assert ctx.summary("tokenizer")["path"] == str(new / "tokenizer")
    assert str(old) not in (new / "tokenizer" / manifest.MANIFEST).read_text()

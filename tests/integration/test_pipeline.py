"""The smoke recipe end to end through the CLI: every stage, a report, manifests, and a re-run that
skips every finished stage."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stepwise.config import load_recipe

REPO = Path(__file__).resolve().parents[2]


def stepwise(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-m", "stepwise.cli", *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


@pytest.mark.slow
def test_smoke_recipe_runs_every_stage_and_skips_them_on_rerun(tmp_path):
    run_dir = tmp_path / "smoke"
    first = stepwise("run", "recipes/tiny/smoke.yaml", f"run.dir={run_dir}")
    assert f"report: {run_dir}/report.md" in first.stdout
    report = json.loads((run_dir / "report.json").read_text())
    base = report["stages"]["eval"]["base"]
    assert base["problems"] == 64 and 0 <= base["accuracy"] <= 1
    assert report["stages"]["grade"]["samples"] == 16
    assert (run_dir / "export" / "policy" / "model.safetensors").is_file()
    stages = load_recipe(REPO / "recipes/tiny/smoke.yaml").run.stages
    assert {"select", "segment", "complete", "critic", "advantage", "policy", "dapo_eval"} <= set(stages)
    for stage in stages:
        assert json.loads((run_dir / stage / "manifest.json").read_text())["stage"] == stage
    assert report["stages"]["dapo_eval"]["iteration_1"]["problems"] == 64
    assert report["stages"]["critic"]["train"]["states"] > 0
    assert (run_dir / "dapo_eval" / "policy" / "model.safetensors").is_file()
    assert "| iteration_1 | 64 |" in (run_dir / "report.md").read_text()
    second = stepwise("run", "recipes/tiny/smoke.yaml", f"run.dir={run_dir}")
    assert second.stdout.count("up to date, skipped") == len(stages)


def test_bad_override_fails_before_any_work(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    result = subprocess.run([sys.executable, "-m", "stepwise.cli", "run", "recipes/tiny/smoke.yaml",
                             "sft.optim.lrr=1", f"run.dir={tmp_path}/x"], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 2
    assert "unknown key 'sft.optim.lrr'; did you mean 'lr'?" in result.stderr
    assert not (tmp_path / "x").exists()

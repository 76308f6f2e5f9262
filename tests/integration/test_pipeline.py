"""The smoke recipe end to end through the CLI: every stage, a report, manifests, and a re-run that
skips every finished stage."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stepwise.checkpoint import layout as ckpt_layout
from stepwise.config import load_recipe

REPO = Path(__file__).resolve().parents[2]


def stepwise(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-m", "stepwise.cli", *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


@pytest.mark.slow
def a_smaller_critic_model(run_dir: Path) -> Path:
    """A random HF model of another shape (hidden 64, 2 heads, 1 KV head) with the run's task tokenizer."""
    from stepwise.models.init import random_hf_model
    from stepwise.tasks.tokenizer import load_tokenizer

    stepwise("run", "recipes/tiny/smoke.yaml", f"run.dir={run_dir}", "run.stages=[data,tokenizer]")
    shape = dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, max_position_embeddings=128, tie_word_embeddings=True)
    return random_hf_model(shape, load_tokenizer(run_dir / "tokenizer"), run_dir.parent / "critic_hf", seed=5)


@pytest.mark.slow
def test_smoke_recipe_runs_every_stage_and_skips_them_on_rerun(tmp_path):
    """Two Skywork DAPO iterations, the critic from another (smaller) model at its own layout (TP 1,
    one process, beside the policy's TP 2), then a re-run that skips everything."""
    run_dir = tmp_path / "smoke"
    critic_hf = a_smaller_critic_model(run_dir)
    demo_stages = load_recipe(REPO / "recipes/tiny/skywork_dapo_arith.yaml").run.stages  # with mc_ablation
    overrides = (f"run.dir={run_dir}", "skywork_dapo.iterations=2", f"skywork_dapo.critic_init={critic_hf}",
                 "critic.parallel.tp=1", "critic.parallel.nproc_per_node=1", f"run.stages=[{','.join(demo_stages)}]")
    first = stepwise("run", "recipes/tiny/smoke.yaml", *overrides)
    assert f"report: {run_dir}/report.md" in first.stdout
    report = json.loads((run_dir / "report.json").read_text())
    base = report["stages"]["eval"]["base"]
    assert base["problems"] == 64 and 0 <= base["accuracy"] <= 1
    assert report["stages"]["grade"]["samples"] == 16
    assert (run_dir / "export" / "policy" / "model.safetensors").is_file()
    stages = load_recipe(REPO / "recipes/tiny/smoke.yaml").run.stages
    assert {"select", "segment", "complete", "critic", "advantage", "policy", "dapo_eval"} <= set(stages)
    assert set(demo_stages) == set(stages) | {"mc_ablation"}
    mc = report["stages"]["mc_ablation"]
    assert mc["value_source"] == "mc" and mc["states"] == report["stages"]["advantage"]["states"]
    for stage in demo_stages:
        assert json.loads((run_dir / stage / "manifest.json").read_text())["stage"] == stage
    assert report["stages"]["dapo_eval"]["iteration_1"]["problems"] == 64
    assert report["stages"]["critic"]["train"]["states"] > 0
    assert (run_dir / "dapo_eval" / "iteration_1" / "model.safetensors").is_file()
    assert "| iteration_1 | 64 |" in (run_dir / "report.md").read_text()
    # iteration 2: pi_ref is iteration 1's policy, its own directories, its own row in the report
    second_round = run_dir / "iteration_2"
    assert {p.name for p in second_round.iterdir()} == {"sample", "grade", "select", "segment", "complete", "critic",
                                                          "advantage", "policy", "dapo_eval"}
    assert report["stages"]["iteration_2/dapo_eval"]["iteration_2"]["problems"] == 64
    assert "| iteration_2 | 64 |" in (run_dir / "report.md").read_text()
    meta = ckpt_layout.read_meta(ckpt_layout.resolve(second_round / "policy" / "checkpoints"))
    assert meta["init"] == str(run_dir / "policy" / "checkpoints")
    critic_meta = ckpt_layout.read_meta(ckpt_layout.resolve(run_dir / "critic" / "checkpoints"))
    assert critic_meta["init"] == str(run_dir / "init" / "critic") and critic_meta["tp"] == 1 and critic_meta["dp"] == 1
    assert json.loads((run_dir / "critic" / "checkpoints" / "hf" / "config.json").read_text())["hidden_size"] == 64
    second = stepwise("run", "recipes/tiny/smoke.yaml", *overrides)
    assert second.stdout.count("up to date, skipped") == len(demo_stages) + 9


def test_bad_override_fails_before_any_work(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    result = subprocess.run([sys.executable, "-m", "stepwise.cli", "run", "recipes/tiny/smoke.yaml",
                             "sft.optim.lrr=1", f"run.dir={tmp_path}/x"], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 2
    assert "unknown key 'sft.optim.lrr'; did you mean 'lr'?" in result.stderr
    assert not (tmp_path / "x").exists()

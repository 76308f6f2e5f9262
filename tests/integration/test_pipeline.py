"""The smoke recipe end to end through the CLI: every stage, a report, manifests, and a re-run that
skips every finished stage."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stepwise.checkpoint import layout as ckpt_layout
from stepwise.config import load_recipe
from stepwise.data.jsonl import read_jsonl
from stepwise.pipeline.stages.scoring import scores_of
from tests.tolerance import output_bound, within

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
@pytest.mark.timeout(1800)  # whole pipelines: slow machines get twice the 900 s default
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
    for trained in ("sft", "critic", "policy", "rs", "mc_ablation"):  # the report's tokens/s column
        summary = report["stages"][trained]
        assert "skipped" in summary or summary["final"]["tokens_per_s"] > 0, trained  # smoke: too few samples for RS
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
    advantage_is_the_same_without_packing(run_dir, overrides, demo_stages, critic_hf)


def _logit(value: float) -> float:
    return math.log(value / (1 - value))


def advantage_is_the_same_without_packing(run_dir: Path, overrides: tuple, stages: list[str], critic_hf: Path) -> None:
    """The advantage stage of a copy of the run, its next states one record each (not one branched record
    per state) and pi_ref's log-probs one row per action (not prefix-packed): the same actions, values,
    advantages and log-probs within the fp32 reordering bound (tests/tolerance.py) of each model."""
    flat_dir = run_dir.parent / "unpacked"
    shutil.copytree(run_dir, flat_dir)
    upto = stages[: stages.index("advantage") + 1]
    stepwise("run", "recipes/tiny/smoke.yaml", *overrides[1:], f"run.dir={flat_dir}", "skywork_dapo.iterations=1",
             "critic.pack_prefixes=false", "policy.pack_prefixes=false", f"run.stages=[{','.join(upto)}]")
    assert all("branches" in r for r in read_jsonl(run_dir / "advantage" / "next.jsonl"))
    assert not any("branches" in r for r in read_jsonl(flat_dir / "advantage" / "next.jsonl"))
    packed, flat = (read_jsonl(d / "advantage" / "actions.jsonl") for d in (run_dir, flat_dir))
    assert [(a["state_id"], a["action_ids"]) for a in packed] == [(a["state_id"], a["action_ids"]) for a in flat]
    assert len(packed) > 0
    recipe = load_recipe(REPO / "recipes/tiny/smoke.yaml")
    policy_config, seq = recipe.model.hf_config, recipe.model.max_seq_len
    critic_config = json.loads((critic_hf / "config.json").read_text())
    packed_values, flat_values = ([v for row in scores_of(d / "advantage" / "next.jsonl") for v in row["values"]]
                                  for d in (run_dir, flat_dir))
    assert len(packed_values) == len(flat_values) > 0, "no next state was valued by the critic"
    values = list(zip(packed_values, flat_values))
    logit_scale = max(abs(_logit(v)) for pair in values for v in pair)
    value_bound = output_bound(logit_scale, critic_config, seq) / 4  # sigmoid' <= 1/4
    within("next-state value unpacked vs packed", max(abs(a - b) for a, b in values), value_bound)
    within("advantage unpacked vs packed", max(abs(a["advantage"] - b["advantage"]) for a, b in zip(packed, flat)),
           2 * value_bound)  # V(s') minus the mean of the state's V(s')
    logp_scale = max(abs(a["ref_logp"]) for a in packed)
    within("pi_ref log-prob unpacked vs packed", max(abs(a["ref_logp"] - b["ref_logp"]) for a, b in zip(packed, flat)),
           output_bound(logp_scale, policy_config, seq))


def test_bad_override_fails_before_any_work(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    result = subprocess.run([sys.executable, "-m", "stepwise.cli", "run", "recipes/tiny/smoke.yaml",
                             "sft.optim.lrr=1", f"run.dir={tmp_path}/x"], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 2
    assert "unknown key 'sft.optim.lrr'; did you mean 'lr'?" in result.stderr
    assert not (tmp_path / "x").exists()

"""The critic trains through the one worker/loop at TP=2: trunk from a policy checkpoint, fresh
value head, critic_bce on MC targets; the loss falls and the checkpoint is marked as a critic."""
from __future__ import annotations

import json
import random

import pytest

from stepwise.checkpoint import layout
from stepwise.config import load_recipe, to_yaml
from stepwise.data.jsonl import write_jsonl
from stepwise.models.init import random_hf_model
from stepwise.tasks.arith import ArithConfig, corpus, make_problems
from stepwise.tasks.tokenizer import load_tokenizer, train_task_tokenizer
from tests.conftest import REPO, run_python, run_torchrun


@pytest.mark.slow
def test_critic_bce_training_at_tp2(tmp_path):
    config = ArithConfig(seed=0)
    problems = make_problems(config, 256, "train")
    tokenizer_dir = train_task_tokenizer(corpus(config) + [p["problem"] + p["solution"] for p in problems], tmp_path / "tok")
    recipe = load_recipe(REPO / "recipes/tiny/smoke.yaml", ["sft.loss=critic_bce", "sft.max_steps=12",
                                                            "sft.log_every=1", "sft.optim.lr=1e-3"])
    (tmp_path / "recipe.yaml").write_text(to_yaml(recipe))
    hf_dir = random_hf_model(recipe.model.hf_config, load_tokenizer(tokenizer_dir), tmp_path / "hf", seed=0)
    run_python(REPO / "conversion/hf_to_megatron.py", "--hf", hf_dir, "--out", tmp_path / "policy")
    rng = random.Random(0)
    records = []
    for problem in problems:
        steps = problem["solution"].split("\n")
        # a learnable signal: states whose last written digit is even are "good"
        mc = [1.0 if int(problem["problem"][3]) % 2 == 0 else 0.0] + [float(int(s[-1]) % 2 == 0) for s in steps[:-2]]
        records.append({"prompt": problem["problem"], "steps": steps, "mc": [min(1.0, max(0.0, v + rng.uniform(-0.1, 0.1))) for v in mc]})
    write_jsonl(tmp_path / "states.jsonl", records)
    run_torchrun(2, REPO / "stepwise/train/worker.py", "--recipe", tmp_path / "recipe.yaml", "--section", "sft",
                 "--data", tmp_path / "states.jsonl", "--tokenizer", tokenizer_dir, "--init", tmp_path / "policy",
                 "--out", tmp_path / "critic")
    meta = layout.read_meta(layout.latest_iteration(tmp_path / "critic"))
    assert meta["model_kind"] == "critic" and meta["step"] == 12
    history = [json.loads(line) for line in (tmp_path / "critic" / "metrics.jsonl").read_text().splitlines()]
    assert history[-1]["bce_sum"] / history[-1]["states"] < history[0]["bce_sum"] / history[0]["states"]

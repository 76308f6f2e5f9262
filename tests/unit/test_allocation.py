"""stepwise.config.allocation: a recipe's layouts against a Slurm allocation (nodes x GPUs per node)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from stepwise.config.allocation import layouts, main, misfits
from stepwise.config.schema import ParallelConfig, RecipeConfig

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures" / "configs"
BIG = REPO / "recipes" / "skywork_dapo" / "qwen2.5-72b-instruct_8n8g_tp8pp4.yaml"
BIG_MODELS = [f"model.path={FIXTURES / 'Qwen2.5-72B-Instruct.json'}",
              f"skywork_dapo.critic_init={FIXTURES / 'Qwen2.5-Math-7B-Instruct.json'}"]


def recipe(stages: list[str], nnodes: int = 8, nproc: int = 8, launcher: str = "srun", **own) -> RecipeConfig:
    config = RecipeConfig()
    config.run.stages = stages
    config.parallel = ParallelConfig(tp=8, pp=4, nproc_per_node=nproc, nnodes=nnodes, launcher=launcher)
    for section, layout in own.items():
        getattr(config, section).parallel = layout
    return config


def test_a_fitting_allocation_has_no_misfits():
    config = recipe(["sft", "critic", "advantage", "policy"],
                    critic=ParallelConfig(tp=4, nproc_per_node=8, nnodes=8, launcher="srun"))
    assert misfits(config, nodes=8, gpus_per_node=8) == []
    assert misfits(config, nodes=16, gpus_per_node=8) == []  # more nodes than needed: the rest idle


def test_too_few_nodes_names_the_stage_the_keys_and_the_allocation():
    config = recipe(["critic", "policy"], critic=ParallelConfig(tp=4, nproc_per_node=8, nnodes=8, launcher="srun"))
    found = misfits(config, nodes=2, gpus_per_node=8, recipe="R.yaml")
    assert found == [
        "recipe R.yaml: stage policy needs 8 nodes x 8 processes (parallel.nnodes=8, parallel.nproc_per_node=8) "
        "but the allocation has 2 nodes x 8 GPUs",
        "recipe R.yaml: stage critic needs 8 nodes x 8 processes (critic.parallel.nnodes=8, "
        "critic.parallel.nproc_per_node=8) but the allocation has 2 nodes x 8 GPUs",
    ]


def test_processes_per_node_must_equal_the_gpus_per_node():
    config = recipe(["sft"], nnodes=1, nproc=8, launcher="torchrun")
    assert misfits(config, nodes=1, gpus_per_node=8) == []
    (message,) = misfits(config, nodes=1, gpus_per_node=4)
    assert "stage sft needs 1 node x 8 processes" in message and "the allocation has 1 node x 4 GPUs" in message


def test_on_cpu_only_the_node_count_matters():
    config = recipe(["sft"], nnodes=2, nproc=3)
    assert misfits(config, nodes=2, gpus_per_node=0) == []
    (message,) = misfits(config, nodes=1, gpus_per_node=0)
    assert "needs 2 nodes x 3 processes" in message and "1 node (CPU, GPUS_PER_NODE=0)" in message


def test_more_than_one_node_needs_srun():
    (message,) = misfits(recipe(["sft"], nnodes=2, launcher="torchrun"), nodes=2, gpus_per_node=8)
    assert "parallel.launcher=torchrun" in message and "needs parallel.launcher=srun" in message


def test_advantage_scores_at_the_critic_layout_and_unused_sections_do_not_count():
    critic = ParallelConfig(tp=4, nproc_per_node=8, nnodes=4, launcher="srun")
    used = recipe(["advantage"], nnodes=1, critic=critic)
    assert [u.key for u in layouts(used)] == ["parallel", "critic.parallel"]
    assert any("critic.parallel.nnodes=4" in m for m in misfits(used, nodes=1, gpus_per_node=8))
    # a section with a layout of its own is checked even when its stage is not listed (it was set on purpose)
    assert [u.key for u in layouts(recipe(["sft"], nnodes=1, critic=critic))] == ["parallel", "critic.parallel"]
    assert [u.key for u in layouts(recipe(["sft"], nnodes=1))] == ["parallel"]


def test_command_line_exit_codes_and_message(capsys):
    assert main([str(BIG), *BIG_MODELS, "--nodes", "8", "--gpus-per-node", "8"]) == 0
    assert main([str(BIG), "--nodes", "2", *BIG_MODELS, "--gpus-per-node", "8"]) == 2  # options anywhere
    err = capsys.readouterr().err
    assert f"recipe {BIG}: stage critic needs 8 nodes x 8 processes (critic.parallel.nnodes=8, " \
           "critic.parallel.nproc_per_node=8) but the allocation has 2 nodes x 8 GPUs" in err
    assert main([str(BIG), *BIG_MODELS, "parallel.nnodes=4", "critic.parallel.nnodes=2",
                 "--nodes", "4", "--gpus-per-node", "8"]) == 0  # overrides apply
    assert main(["recipes/tiny/no_such_recipe.yaml", "--nodes", "1", "--gpus-per-node", "0"]) == 2
    assert "cannot load the recipe" in capsys.readouterr().err


def test_nodes_come_from_the_environment_inside_a_job(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "1")
    monkeypatch.setenv("GPUS_PER_NODE", "0")
    assert main([str(REPO / "recipes/tiny/smoke.yaml")]) == 0
    monkeypatch.delenv("SLURM_JOB_NUM_NODES")
    with pytest.raises(SystemExit):  # outside a job, --nodes is required
        main([str(REPO / "recipes/tiny/smoke.yaml")])


def test_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "stepwise.config.allocation", str(BIG), *BIG_MODELS,
                             "--nodes", "2", "--gpus-per-node", "8"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2 and "but the allocation has 2 nodes x 8 GPUs" in result.stderr

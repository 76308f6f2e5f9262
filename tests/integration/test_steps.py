"""Launched steps (stepwise.pipeline.step): data-parallel sampling replicas give the shards of one
worker byte for byte, a step's result comes back to the driver, and workers never inherit the driver's
rendezvous (srun workers get the first node's address from the launcher)."""
from __future__ import annotations

import filecmp
from pathlib import Path

import pytest

from stepwise.config import load_recipe, to_yaml
from stepwise.config.schema import ParallelConfig
from stepwise.pipeline.context import StageContext
from stepwise.pipeline.launch import worker_command, worker_env
from stepwise.pipeline.step import in_step
from stepwise.sampling import SamplingParams
from tests.conftest import REPO
from tests.helpers import make_tiny_hf_qwen2


def sample_for_test(ctx: StageContext, model_dir: str, out: str) -> dict:
    """(Runs in the step.) 10 prompts x 2 samples in shards of 3 prompts, this worker's share."""
    from stepwise.pipeline.stages.sampling import sample_shards

    records = [{"id": str(i), "problem": f"{i}+{i * 7}="} for i in range(10)]
    params = SamplingParams(n=2, temperature=1.0, max_tokens=8, seed=3)
    sample_shards(ctx, model_dir, records, "problem", params, Path(out), 3, 4, "test")
    return {"world_size": ctx.world_size}


def context(tmp_path: Path) -> StageContext:
    config = load_recipe(REPO / "recipes/tiny/smoke.yaml", [f"run.dir={tmp_path}"])
    (tmp_path / "recipe.resolved.yaml").write_text(to_yaml(config))
    return StageContext(config=config, run_dir=tmp_path)


@pytest.mark.slow
def test_one_and_two_sampling_replicas_write_identical_shards(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the same kernels in both runs
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    model = make_tiny_hf_qwen2(tmp_path / "model")
    ctx = context(tmp_path)
    outs = {}
    for workers in (1, 2):
        outs[workers] = tmp_path / f"replicas_{workers}"
        result = in_step(ctx, sample_for_test, ParallelConfig(nproc_per_node=workers), model_dir=str(model),
                         out=str(outs[workers]))
        assert result == {"world_size": workers}
    names = sorted(p.name for p in outs[1].glob("shard_*.jsonl"))
    assert names == [f"shard_{i:05d}.jsonl" for i in range(4)]
    assert names == sorted(p.name for p in outs[2].glob("shard_*.jsonl"))
    match, mismatch, errors = filecmp.cmpfiles(outs[1], outs[2], names, shallow=False)
    assert (mismatch, errors) == ([], []) and len(match) == 4


def test_workers_never_inherit_the_drivers_rendezvous(monkeypatch):
    for name, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "RANK": "0", "WORLD_SIZE": "1",
                        "LOCAL_RANK": "0", "TORCHELASTIC_RUN_ID": "x"}.items():
        monkeypatch.setenv(name, value)
    env = worker_env(ParallelConfig(nproc_per_node=2))
    assert not {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"} & set(env)


def test_srun_workers_get_the_first_nodes_address_and_extra_arguments(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.9")  # the driver's own: never passed on
    monkeypatch.setenv("STEPWISE_MASTER_ADDR", "127.0.0.2")
    monkeypatch.setenv("STEPWISE_SRUN_ARGS", "--container-image=img --container-mounts=/repo")
    layout = ParallelConfig(nproc_per_node=4, nnodes=2, launcher="srun")
    env = worker_env(layout)
    assert env["MASTER_ADDR"] == "127.0.0.2" and 0 < int(env["MASTER_PORT"]) < 65536
    command = worker_command(layout, "stepwise.pipeline.step", ["request.json"])
    assert command[:5] == ["srun", "--kill-on-bad-exit=1", "--nodes=2", "--ntasks=8", "--ntasks-per-node=4"]
    assert command[5:7] == ["--container-image=img", "--container-mounts=/repo"]


def test_one_local_worker_needs_no_agent():
    command = worker_command(ParallelConfig(nproc_per_node=1), "stepwise.pipeline.step", ["r.json"])
    assert command[1:] == ["-m", "stepwise.pipeline.step", "r.json"]
    assert "torch.distributed.run" in worker_command(ParallelConfig(nproc_per_node=2), "m", [])


def test_vllm_replicas_are_tensor_parallel_groups_on_every_node(tmp_path):
    from stepwise.pipeline.step import replicas

    ctx = context(tmp_path)
    ctx.config.parallel = ParallelConfig(nproc_per_node=8, nnodes=8, launcher="srun")
    assert (replicas(ctx).nproc_per_node, replicas(ctx).nnodes) == (8, 8)  # HF: one per GPU
    ctx.config.sampling.backend, ctx.config.sampling.tensor_parallel_size = "vllm", 4
    assert (replicas(ctx).nproc_per_node, replicas(ctx).nnodes, replicas(ctx).launcher) == (2, 8, "srun")
    ctx.config.sampling.tensor_parallel_size = 3
    with pytest.raises(ValueError, match="tensor_parallel_size=3 does not divide parallel.nproc_per_node=8"):
        replicas(ctx)

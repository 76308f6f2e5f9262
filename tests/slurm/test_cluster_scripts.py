"""The cluster scripts of slurm/ on the local two-node Slurm (tests/slurm/local_cluster.sh).

What is checked, honestly: every script parses (`bash -n`); its #SBATCH header is the intended one
(read from the file) and sbatch accepts it (`--test-only`: with the defaults the local cluster, which
has no GPUs, two nodes and 2 CPUs each, answers with the specific resource refusal, which only comes
after the whole header parsed; with the counts brought down to what it has it schedules the job);
the controller stores --requeue/--exclusive/--nodes of a held submission; a recipe whose layouts do
not fit the allocation fails the job before any step, naming both; two srun tasks on two nodes meet
at common.sh's rendezvous address (the first node's NodeAddr) and all-reduce over gloo (the whole
pipeline through the headline script on two nodes, with a requeue, is test_two_node_pipeline.py);
convert.sh passes its arguments to `stepwise convert` in an srun step; and
common.sh's exports (rendezvous, pyxis options) outside a job. Nothing here uses a GPU, pyxis, or a
real 72B stage; the GPU counts of the headers are only checked as far as sbatch parses them.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
from pathlib import Path

import pytest

from tests.slurm.test_local_slurm import read_log, submit_and_wait

REPO = Path(__file__).resolve().parents[2]
SLURM = REPO / "slurm"
SCRIPTS = sorted(p.name for p in SLURM.glob("*.sh"))
CLUSTER_SCRIPTS = {  # script: (default recipe, nodes, GPUs per node) of its header
    "dapo_qwen72b.sh": ("recipes/skywork_dapo/qwen2.5-72b-instruct_8n8g_tp8pp4.yaml", 8, 8),
    "dapo_qwen7b.sh": ("recipes/skywork_dapo/qwen2.5-math-7b-instruct_1n8g_tp4.yaml", 1, 8),
    "dqo_qwen2_7b.sh": ("recipes/dqo/qwen2-7b-instruct_1n8g_tp4.yaml", 1, 8),
    "eval.sh": ("recipes/skywork_dapo/qwen2.5-math-7b-instruct_1n8g_tp4.yaml", 1, 8),
    "convert.sh": (None, 1, 0),
}
FIXTURES = REPO / "tests" / "fixtures" / "configs"
BIG_MODELS = [f"model.path={FIXTURES / 'Qwen2.5-72B-Instruct.json'}",
              f"skywork_dapo.critic_init={FIXTURES / 'Qwen2.5-Math-7B-Instruct.json'}"]


def header(script: str) -> dict[str, str]:
    """The #SBATCH options of a script as {option: value} ("" for flags)."""
    options = {}
    for line in (SLURM / script).read_text().splitlines():
        if line.startswith("#SBATCH"):
            for option in line.split()[1:]:
                key, _, value = option.partition("=")
                options[key] = value
    return options


def sbatch_test_only(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["sbatch", "--test-only", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_parses(script):
    result = subprocess.run(["bash", "-n", str(SLURM / script)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_every_cluster_script_exists_with_its_default_recipe():
    assert set(CLUSTER_SCRIPTS) <= set(SCRIPTS)
    for script, (recipe, nodes, gpus) in CLUSTER_SCRIPTS.items():
        options = header(script)
        assert options["--nodes"] == str(nodes), script
        assert options.get("--gpus-per-node", "0") == str(gpus), script
        if recipe:
            assert (REPO / recipe).is_file() and f"RECIPE_DEFAULT={recipe}" in (SLURM / script).read_text()


def test_the_headline_script_asks_for_one_whole_allocation_and_a_requeue():
    options = header("dapo_qwen72b.sh")
    assert {k: options.get(k) for k in ("--nodes", "--ntasks-per-node", "--gpus-per-node", "--exclusive",
                                        "--signal", "--requeue")} == {
        "--nodes": "8", "--ntasks-per-node": "1", "--gpus-per-node": "8", "--exclusive": "",
        "--signal": "B:USR1@600", "--requeue": ""}


def sourced(env: dict[str, str], *names: str) -> dict[str, str]:
    """NAME=value of each variable after sourcing common.sh outside a job (no Slurm needed)."""
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}  # as outside any job
    printed = "; ".join(f'echo "{name}=${{{name}-<unset>}}"' for name in names)
    result = subprocess.run(["bash", "-c", f"source {SLURM / 'common.sh'} && {printed}"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return dict(line.split("=", 1) for line in result.stdout.splitlines())


def test_common_sh_exports_the_rendezvous_for_the_launcher_and_no_worker_variables():
    env = dict(os.environ, MASTER_ADDR="127.0.0.9", MASTER_PORT="1", RANK="3", WORLD_SIZE="8",
               STEPWISE_MASTER_ADDR="127.0.0.10", STEPWISE_SRUN_ARGS="", CONTAINER="")
    got = sourced(env, "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "STEPWISE_MASTER_ADDR",
                  "STEPWISE_MASTER_PORT", "STEPWISE_SRUN_ARGS", "NNODES")
    assert got["MASTER_ADDR"] == got["MASTER_PORT"] == got["RANK"] == got["WORLD_SIZE"] == "<unset>"
    assert got["STEPWISE_MASTER_ADDR"] == socket.gethostname().split(".")[0]  # outside a job: this host
    assert got["STEPWISE_MASTER_PORT"] == "20000" and got["NNODES"] == "1" and got["STEPWISE_SRUN_ARGS"] == ""


def test_a_container_adds_pyxis_options_to_every_srun():
    env = dict(os.environ, CONTAINER="nvcr.io/nvidia/pytorch:25.01-py3", STEPWISE_SRUN_ARGS="")
    got = sourced(env, "STEPWISE_SRUN_ARGS", "STEPWISE_WORKER_PYTHON", "PYTHONPATH")
    assert got["STEPWISE_SRUN_ARGS"] == (f"--container-image=nvcr.io/nvidia/pytorch:25.01-py3 "
                                         f"--container-mounts={REPO}:{REPO} --container-workdir={REPO}")
    assert got["STEPWISE_WORKER_PYTHON"] == "python3" and got["PYTHONPATH"].split(":")[0] == str(REPO)
    env.update(CONTAINER_MOUNTS="/data:/data,/scratch:/scratch", STEPWISE_SRUN_ARGS="--mpi=pmix")
    assert sourced(env, "STEPWISE_SRUN_ARGS")["STEPWISE_SRUN_ARGS"] == (
        f"--mpi=pmix --container-image=nvcr.io/nvidia/pytorch:25.01-py3 "
        f"--container-mounts=/data:/data,/scratch:/scratch --container-workdir={REPO}")


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(CLUSTER_SCRIPTS))
def test_sbatch_test_only_with_the_defaults_and_with_local_counts(slurm_env, script):
    _, nodes, gpus = CLUSTER_SCRIPTS[script]
    default = sbatch_test_only([f"slurm/{script}"], slurm_env)
    assert default.returncode != 0, default.stderr  # the local cluster cannot hold the defaults ...
    refusal = ("Invalid generic resource (gres) specification" if gpus
               else "Requested node configuration is not available")
    assert refusal in default.stderr, default.stderr  # ... and says why: no GPUs (or too few CPUs / memory)
    if nodes > 2:  # without the GPUs, the header's node count alone is still more than the two local nodes
        no_gpus = sbatch_test_only(["--gpus-per-node=0", f"slurm/{script}"], slurm_env)
        assert "Requested node configuration is not available" in no_gpus.stderr, no_gpus.stderr
    local = ["-N", str(min(nodes, 2)), "--gpus-per-node=0", "--cpus-per-task=1", "--mem=1G", f"slurm/{script}"]
    fits = sbatch_test_only(local, slurm_env)
    assert fits.returncode == 0 and "to start at" in fits.stderr, fits.stderr
    expected = "node[1-2]" if nodes > 1 else "node"
    assert f"on nodes {expected}" in fits.stderr, fits.stderr


@pytest.mark.slurm
@pytest.mark.slow
def test_the_controller_keeps_requeue_exclusive_and_the_node_count(slurm_env):
    submitted = subprocess.run(["sbatch", "--parsable", "--hold", "-N", "2", "--gpus-per-node=0",
                                "--output=/dev/null", "slurm/dapo_qwen72b.sh"],
                               cwd=REPO, env=slurm_env, capture_output=True, text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]
    try:
        shown = subprocess.run(["scontrol", "show", "job", job_id], env=slurm_env, capture_output=True, text=True,
                               timeout=30).stdout
    finally:
        subprocess.run(["scancel", job_id], env=slurm_env, timeout=30)
    fields = dict(re.findall(r"(\w+)=(\S*)", shown))
    nodes = fields["NumNodes"].split("-")[0]  # a pending job shows its range, "2-2"
    assert (fields["Requeue"], fields["OverSubscribe"], nodes, fields["NumTasks"]) == ("1", "NO", "2", "2"), shown
    assert fields["JobName"] == "stepwise-dapo-qwen72b", shown


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", ["headline_recipe", "tiny_recipe_on_cpu"])
def test_a_layout_that_does_not_fit_fails_before_any_step(slurm_env, tmp_path, case):
    run_dir = tmp_path / "run"
    if case == "headline_recipe":  # the default 72B recipe (config.json fixtures for the models), 8 GPUs claimed
        env = dict(slurm_env, GPUS_PER_NODE="8")
        args, stage, have = BIG_MODELS, "critic", "2 nodes x 8 GPUs"
        key = "critic.parallel"
    else:  # a tiny recipe made to ask for 4 CPU nodes
        env = dict(slurm_env, GPUS_PER_NODE="0")
        args = ["recipes/tiny/smoke.yaml", "parallel.nnodes=4", "parallel.nproc_per_node=1", "parallel.launcher=srun"]
        stage, have, key = "sft", "2 nodes (CPU, GPUS_PER_NODE=0)", "parallel"
    output = tmp_path / "job.out"
    job_id, fields = submit_and_wait(["-N", "2", "--gpus-per-node=0", f"--output={output}", "slurm/dapo_qwen72b.sh",
                                      *args, f"run.dir={run_dir}"], REPO, env, timeout=240)
    log = read_log(output)
    assert (fields.get("JobState"), fields.get("ExitCode")) == ("FAILED", "2:0"), f"job {job_id}: {fields}\n{log}"
    wanted = {"headline_recipe": "8 nodes x 8 processes", "tiny_recipe_on_cpu": "4 nodes x 1 process"}[case]
    assert re.search(rf"recipe \S+: stages? (\w+, )*{stage}\b.* needs? {wanted} "
                     rf"\({key}\.nnodes=\d+, {key}\.nproc_per_node=\d+\) "
                     rf"but the allocation has {re.escape(have)}", log), log
    assert "nothing was started" in log, log
    assert "[stepwise] exit code" not in log and not run_dir.exists(), log  # stepwise run never started


RENDEZVOUS = """\
#!/usr/bin/env bash
#SBATCH --job-name=stepwise-rendezvous
#SBATCH --time=4
source {common}
echo "DRIVER node=$SLURMD_NODENAME MASTER_ADDR=${{MASTER_ADDR:-unset}}" \\
     "STEPWISE_MASTER=$STEPWISE_MASTER_ADDR:$STEPWISE_MASTER_PORT NNODES=$NNODES"
srun --kill-on-bad-exit=1 env MASTER_ADDR="$STEPWISE_MASTER_ADDR" MASTER_PORT="$STEPWISE_MASTER_PORT" \\
    python3 {snippet}
"""

SNIPPET = """\
import os

import torch
import torch.distributed as dist

from stepwise.parallel.runtime import init_distributed

rank, world, _ = init_distributed(timeout_minutes=2)
total = torch.tensor([float(rank + 1)])
dist.all_reduce(total)
print(f"RESULT node={os.environ['SLURM_NODEID']} name={os.environ['SLURMD_NODENAME']} rank={rank} world={world} "
      f"sum={total.item():g}", flush=True)
"""


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_nodes_meet_at_the_rendezvous_of_common_sh(slurm_env, tmp_path):
    script, snippet, output = tmp_path / "rendezvous.sh", tmp_path / "snippet.py", tmp_path / "job.out"
    snippet.write_text(SNIPPET)
    script.write_text(RENDEZVOUS.format(common=SLURM / "common.sh", snippet=snippet))
    env = dict(slurm_env, MASTER_ADDR="127.0.0.9", MASTER_PORT="1",  # stale ones from the submit shell
               STEPWISE_MASTER_ADDR="127.0.0.10")
    job_id, fields = submit_and_wait(["-N", "2", "--ntasks-per-node=1", f"--output={output}", str(script)],
                                     tmp_path, env, timeout=240)
    log = read_log(output)
    assert (fields.get("JobState"), fields.get("ExitCode")) == ("COMPLETED", "0:0"), f"job {job_id}: {fields}\n{log}"
    # the driver (batch step, first node) does not look launched; the address is node1's NodeAddr
    assert "DRIVER node=node1 MASTER_ADDR=unset STEPWISE_MASTER=127.0.0.1:" in log and "NNODES=2" in log, log
    results = sorted(re.findall(r"RESULT node=(\d) name=(\S+) rank=(\d) world=(\d) sum=(\S+)", log))
    assert results == [("0", "node1", "0", "2", "3"), ("1", "node2", "1", "2", "3")], log


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_convert_passes_its_arguments_to_stepwise_convert_in_an_srun_step(slurm_env, tmp_path):
    output = tmp_path / "job.out"
    job_id, fields = submit_and_wait(["--cpus-per-task=1", "--mem=1G", f"--output={output}", "slurm/convert.sh",
                                      "hf-to-megatron", "--help"], REPO, slurm_env, timeout=240)
    log = read_log(output)
    assert (fields.get("JobState"), fields.get("ExitCode")) == ("COMPLETED", "0:0"), f"job {job_id}: {fields}\n{log}"
    assert "stepwise convert hf-to-megatron --help" in log and "--hf HF --out OUT" in log, log
    job_id, fields = submit_and_wait(["--cpus-per-task=1", "--mem=1G", f"--output={output}", "slurm/convert.sh"],
                                     REPO, slurm_env, timeout=120)
    assert fields.get("ExitCode") == "2:0" and "usage: sbatch slurm/convert.sh" in read_log(output)

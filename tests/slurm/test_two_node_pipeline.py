"""The headline script on two nodes: `sbatch -N 2 slurm/dapo_qwen72b.sh recipes/tiny/smoke_2nodes.yaml` runs
the whole Skywork DAPO pipeline with the driver in the batch step on node1 and every stage's workers as srun
steps (training at TP 2 across node1 and node2, the critic at PP 2 across them, sampling, grading and
completion on two replicas, one per node); then the same run from the policy stage on (its directory a copy
of the first run's up to the advantage stage), with USR1 sent to the batch shell during policy training:
the workers save, the job requeues itself, the rerun resumes inside the policy stage, and the exported
policy and its evaluation equal the uninterrupted run's byte for byte."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.slurm.test_local_slurm import job_fields, read_log, submit_and_wait

REPO = Path(__file__).resolve().parents[2]
RECIPE = "recipes/tiny/smoke_2nodes.yaml"
pytestmark = [pytest.mark.slurm, pytest.mark.slow]
# the stages the interrupted run does again (the others it takes from the uninterrupted run's directory)
REDONE = ("policy", "dapo_eval", "rs", "report", "report.*", ".steps", ".launch")
# what they write that must not depend on an interruption (timings and paths aside)
OUTPUTS = ("dapo_eval/iteration_1/model.safetensors", "dapo_eval/iteration_1/config.json",
           "dapo_eval/iteration_1.graded.jsonl")


def submit(run_dir: Path, output: Path, env: dict) -> str:
    args = ["-N", "2", "--gpus-per-node=0", "--time=20", "--open-mode=append", f"--output={output}",
            "slurm/dapo_qwen72b.sh", RECIPE, f"run.dir={run_dir}"]
    submitted = subprocess.run(["sbatch", "--parsable", *args], cwd=REPO, env=env, capture_output=True, text=True)
    assert submitted.returncode == 0, submitted.stderr
    return submitted.stdout.strip().split(";")[0]


def wait_for_policy_training(run_dir: Path, job_id: str, env: dict, timeout: float = 600) -> None:
    """Until the policy workers logged two steps (USR1 then arrives mid-training)."""
    metrics = run_dir / "policy" / "checkpoints" / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            return
        assert job_fields(job_id, env).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), job_fields(job_id, env)
        time.sleep(0.2)
    raise AssertionError(f"policy training did not start within {timeout} s")


def _poll(job_id: str, env: dict, timeout: float) -> dict:
    """Until the job ends; a requeued job is started at once instead of after Slurm's requeue delay."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        fields = job_fields(job_id, env)
        if fields.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return fields
        if fields.get("JobState") == "PENDING" and fields.get("Reason") == "BeginTime":
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=env, check=False)
        time.sleep(3)
    subprocess.run(["scancel", job_id], env=env)
    return job_fields(job_id, env)


@pytest.mark.timeout(2400)
def test_headline_script_runs_the_pipeline_on_two_nodes_and_a_requeue_changes_nothing(slurm_env, tmp_path):
    env = dict(slurm_env, GPUS_PER_NODE="0")
    logs = Path(slurm_env["SLURM_CONF"]).parent / "log"

    straight, straight_log = tmp_path / "straight", tmp_path / "straight.out"
    job_id, fields = submit_and_wait(["-N", "2", "--gpus-per-node=0", "--time=20", f"--output={straight_log}",
                                      "slurm/dapo_qwen72b.sh", RECIPE, f"run.dir={straight}"], REPO, env, timeout=1100)
    log = read_log(straight_log)
    assert (fields.get("JobState"), fields.get("ExitCode")) == ("COMPLETED", "0:0"), f"job {job_id}: {fields}\n{log}"
    assert "nodes=2 (node[1-2])" in log and "master=127.0.0.1:" in log and "[stepwise] report:" in log, log
    for node in ("node1", "node2"):  # steps of this job ran on both nodes
        assert re.search(rf"launch task StepId={job_id}\.\d+ ", (logs / f"slurmd.{node}.log").read_text()), node
    summary = json.loads((straight / "report.json").read_text())["stages"]
    assert summary["policy"]["final"]["step"] == 60 and summary["sample"]["problems"] == 8

    # the same run again from the policy stage on (a run directory moves: its manifests are relative)
    interrupted, interrupted_log = tmp_path / "interrupted", tmp_path / "interrupted.out"
    shutil.copytree(straight, interrupted)
    for name in REDONE:
        for path in interrupted.glob(name):  # top level only
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    job_id = submit(interrupted, interrupted_log, env)
    wait_for_policy_training(interrupted, job_id, env)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=env, check=True)
    fields = _poll(job_id, env, timeout=1100)
    log = read_log(interrupted_log)
    assert (fields.get("JobState"), fields.get("ExitCode")) == ("COMPLETED", "0:0"), f"job {job_id}: {fields}\n{log}"
    assert int(fields.get("Restarts", "0")) == 1, fields
    assert "saved for requeue" in log, log
    stop = re.search(r"stopping at step (\d+) of 60 \(SIGUSR1\)", log)
    assert stop and int(stop.group(1)) < 60, log
    rerun = log.split("saved for requeue")[1]
    for stage in ("data", "tokenizer", "init", "sft", "export", "sample", "grade", "complete", "critic", "advantage"):
        assert f"[stepwise] {stage}: up to date, skipped" in rerun, (stage, rerun)
    assert f"{stop.group(1)}/60" in rerun, rerun  # the policy resumed from its stop checkpoint, not from step 0
    for name in OUTPUTS:
        assert (straight / name).read_bytes() == (interrupted / name).read_bytes(), name

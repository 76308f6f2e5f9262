"""slurm/tiny_local.sh through a real local slurmctld/slurmd: sbatch accepts it, and the smoke recipe
submitted from the repo root finishes with exit code 0, a report.json, and the layout line in its output."""
from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL")
pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def job_fields(job_id: str, env: dict) -> dict[str, str]:
    shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, env=env).stdout
    return dict(re.findall(r"(\w+)=(\S*)", shown))


def wait_for(job_id: str, env: dict, timeout: float) -> dict[str, str]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        fields = job_fields(job_id, env)
        if fields.get("JobState") in DONE:
            return fields
        time.sleep(3)
    subprocess.run(["scancel", job_id], env=env)
    return job_fields(job_id, env)


def test_sbatch_accepts_the_script(slurm_env):
    result = subprocess.run(["sbatch", "--test-only", "slurm/tiny_local.sh"], cwd=REPO, env=slurm_env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "to start at" in result.stderr


@pytest.mark.timeout(1500)
def test_smoke_recipe_runs_through_sbatch(slurm_env, tmp_path):
    env = dict(slurm_env, RECIPE="recipes/tiny/smoke.yaml")
    env.pop("STEPWISE_ROOT", None)  # the job must find the repo from its submit directory
    submitted = subprocess.run(["sbatch", "--parsable", f"--output={tmp_path}/slurm-%x-%j.out", "slurm/tiny_local.sh",
                                f"run.dir={tmp_path / 'run'}"], cwd=REPO, env=env, capture_output=True, text=True)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]
    fields = wait_for(job_id, env, timeout=600)
    output = tmp_path / f"slurm-stepwise-tiny-{job_id}.out"
    log = output.read_text(errors="replace") if output.exists() else f"(no job output at {output})"
    state, code = fields.get("JobState"), fields.get("ExitCode")
    assert (state, code) == ("COMPLETED", "0:0"), f"job {job_id}: state {state}, exit code {code}\n{log[-8000:]}"
    assert "[stepwise] layout: job=" in log, log[-8000:]
    report = tmp_path / "run" / "report.json"
    assert report.exists(), f"no {report}\n{log[-8000:]}"
    assert isinstance(json.loads(report.read_text()), dict)

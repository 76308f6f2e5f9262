"""slurm/tiny_local.sh through a real local slurmctld/slurmd: accepted by sbatch, and a smoke
run completes with exit code 0, a report, and the layout line in the job output."""
from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def job_field(job_id: str, field: str, env: dict) -> str:
    shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, env=env).stdout
    match = re.search(rf"\b{field}=(\S+)", shown)
    return match.group(1) if match else ""


def test_sbatch_accepts_the_script(slurm_env):
    result = subprocess.run(["sbatch", "--test-only", "slurm/tiny_local.sh"], cwd=REPO, env=slurm_env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "to start at" in result.stderr


def test_smoke_recipe_runs_through_sbatch(slurm_env, tmp_path):
    env = dict(slurm_env, RECIPE="recipes/tiny/smoke.yaml", STEPWISE_ROOT=str(REPO))
    output = tmp_path / "job.out"
    submitted = subprocess.run(["sbatch", "--parsable", f"--output={output}", str(REPO / "slurm/tiny_local.sh"),
                                f"run.dir={tmp_path / 'run'}"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]
    deadline = time.time() + 900
    state = ""
    while time.time() < deadline:
        state = job_field(job_id, "JobState", env)
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            break
        time.sleep(3)
    log = output.read_text() if output.exists() else "(no job output)"
    assert state == "COMPLETED" and job_field(job_id, "ExitCode", env) == "0:0", f"job {job_id} {state}:\n{log[-5000:]}"
    assert "[stepwise] layout: job=" in log
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["stages"]["eval"]["base"]["problems"] == 64

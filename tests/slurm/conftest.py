"""A session-wide local Slurm cluster for the tests of slurm/ (skipped only without root or apt-get)."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("local_cluster.sh")


@pytest.fixture(scope="session")
def slurm_env():
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        reason = "local Slurm needs root and apt-get to install slurm-wlm + munge"
        print(f"SKIP slurm tests: {reason}")
        pytest.skip(reason)
    state = Path(tempfile.mkdtemp(prefix="stepwise-slurm-"))
    started = subprocess.run(["bash", str(SCRIPT), "start", str(state)], capture_output=True, text=True, timeout=900)
    if started.returncode != 0:
        raise RuntimeError(f"local Slurm did not start:\n{started.stdout}\n{started.stderr}")
    env = dict(os.environ, SLURM_CONF=str(state / "slurm.conf"))
    yield env
    subprocess.run(["bash", str(SCRIPT), "stop", str(state)], capture_output=True, timeout=60)

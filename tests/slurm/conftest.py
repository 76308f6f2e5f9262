"""A session-wide local Slurm cluster for the tests of slurm/ (skipped only without root or apt-get).
The state directory is fixed (STEPWISE_SLURM_STATE, default /tmp/stepwise-slurm) so a crashed run's
daemons are found again by their pid files instead of blocking the ports; two pytest sessions on one
machine share it (the last one out stops it)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("local_cluster.sh")


@pytest.fixture(scope="session")
def slurm_env() -> dict[str, str]:
    """The environment for Slurm client commands (SLURM_CONF set) while the local cluster is up."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        reason = "local Slurm needs root and apt-get (to install slurm-wlm + munge)"
        print(f"SKIP slurm tests: {reason}")
        pytest.skip(reason)
    state = Path(os.environ.get("STEPWISE_SLURM_STATE", "/tmp/stepwise-slurm"))

    def cluster(action: str, timeout: int) -> subprocess.CompletedProcess:  # our pid: this session uses it
        return subprocess.run(["bash", str(SCRIPT), action, str(state), str(os.getpid())],
                              capture_output=True, text=True, timeout=timeout)

    started = cluster("start", timeout=900)
    if started.returncode != 0:
        pytest.fail(f"local Slurm did not start (exit {started.returncode}):\n{started.stdout}\n{started.stderr}",
                    pytrace=False)
    yield dict(os.environ, SLURM_CONF=str(state / "slurm.conf"))
    cluster("stop", timeout=120)

"""Preemption through the real launcher: SIGUSR1 to the process that launched the workers (as Slurm's
batch script forwards it to `stepwise run`) reaches every torchrun worker; they save at the same step,
and `launch` raises Requeue (exit 75 for `stepwise run`) although torchrun itself reports failure."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stepwise.train.guard import REQUEUE_EXIT_CODE
from tests.integration.test_faults import latest_step, rows

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = """
import sys
from stepwise.config.schema import ParallelConfig
from stepwise.pipeline.launch import launch
from stepwise.train.guard import Requeue
try:
    launch(ParallelConfig(nproc_per_node=2), "tests.integration._fault_worker", [sys.argv[1], "1000", "launch"], sys.argv[1])
except Requeue as stop:
    print("REQUEUE:", stop, flush=True)
    sys.exit(stop.code)
"""


@pytest.mark.slow
def test_sigusr1_to_the_launcher_stops_every_worker_at_one_saved_step(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(tmp_path)], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while len(rows(tmp_path / "launch_rank1.jsonl")) < 3:
        assert launcher.poll() is None, launcher.communicate()
        assert time.monotonic() < deadline, "the workers made no progress"
        time.sleep(0.2)
    launcher.send_signal(signal.SIGUSR1)
    stdout, stderr = launcher.communicate(timeout=240)
    assert launcher.returncode == REQUEUE_EXIT_CODE, f"{stdout[-2000:]}\n{stderr[-4000:]}"
    assert "REQUEUE: stopping at step" in stdout and "SIGUSR1" in stdout
    stops = [rows(tmp_path / f"launch_rank{rank}.jsonl")[-1]["step"] for rank in (0, 1)]
    assert stops[0] == stops[1] == latest_step(tmp_path) < 1000

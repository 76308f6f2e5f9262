"""Launch the training workers of a stage: torchrun on one node (CPU or GPU), srun across a Slurm
allocation. The runner waits, streams their output, and fails with the workers' exit code."""
from __future__ import annotations

import os
import subprocess
import sys

from stepwise.config.schema import ParallelConfig


class LaunchError(RuntimeError):
    """A worker group exited non-zero."""


def worker_command(parallel: ParallelConfig, module: str, args: list[str]) -> list[str]:
    if parallel.launcher == "srun":
        return ["srun", "--kill-on-bad-exit=1", f"--ntasks={parallel.world_size}",
                f"--ntasks-per-node={parallel.nproc_per_node}", sys.executable, "-m", module, *args]
    if parallel.nnodes > 1:
        raise LaunchError("parallel.nnodes > 1 needs parallel.launcher=srun (inside a Slurm allocation)")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={parallel.nproc_per_node}", "-m", module, *args]


def worker_env(parallel: ParallelConfig) -> dict[str, str]:
    env = dict(os.environ)
    cores = os.cpu_count() or 1
    env.setdefault("OMP_NUM_THREADS", str(max(1, cores // parallel.nproc_per_node)))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    env.setdefault("PYTHONWARNINGS", "ignore::UserWarning,ignore::FutureWarning,ignore::DeprecationWarning")
    return env


def launch(parallel: ParallelConfig, module: str, args: list[str]) -> None:
    command = worker_command(parallel, module, args)
    completed = subprocess.run(command, env=worker_env(parallel))
    if completed.returncode != 0:
        raise LaunchError(f"workers exited with code {completed.returncode}: {' '.join(command)}")

"""Launch the workers of a stage: torchrun on one node (CPU or GPU), srun across a Slurm allocation.
The runner waits, streams their output, and fails with the workers' exit code.

Preemption: SIGUSR1 / SIGTERM sent to the pipeline process (Slurm's `--signal`, or the batch
script forwarding it) are passed to the launcher, which passes them to every worker (torchrun is told
to forward SIGUSR1 too); the workers save at the same step and stop for requeue. They leave a marker
file (torchrun reports their exit code 75 as 1), and `launch` raises `Requeue`, so `stepwise run`
itself exits with 75 and a rerun continues from the saved step. The marker lives in the run directory
(a shared file system on a cluster), since the rank that writes it may sit on another node.

Rendezvous: workers take it from their launcher alone. The driver's own rendezvous variables (it may
run under torchrun, or inherit MASTER_ADDR from a shell) are never passed on. torchrun workers get
theirs from `--standalone`; srun workers get MASTER_ADDR = the first node's address (STEPWISE_MASTER_ADDR,
set by slurm/common.sh from `scontrol show node`'s NodeAddr, which works where node names do not
resolve) and a port free on the driver's node, which is the first node of the allocation.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from stepwise.config.schema import ParallelConfig
from stepwise.train.guard import REQUEUE_EXIT_CODE, REQUEUE_MARKER_ENV, STOP_SIGNALS, Requeue

TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


class LaunchError(RuntimeError):
    """A worker group exited non-zero."""


# what a launched process group leaves in a process's environment: never passed on to new workers
RENDEZVOUS_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                        "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME")
SRUN_EXTRA_ENV = "STEPWISE_SRUN_ARGS"  # extra srun arguments (slurm/common.sh: pyxis --container-image ...)
WORKER_PYTHON_ENV = "STEPWISE_WORKER_PYTHON"  # the workers' python inside a container (default: the driver's)
MASTER_ADDR_ENV, MASTER_PORT_ENV = "STEPWISE_MASTER_ADDR", "STEPWISE_MASTER_PORT"


def worker_command(parallel: ParallelConfig, module: str, args: list[str]) -> list[str]:
    if parallel.launcher == "srun":
        return ["srun", "--kill-on-bad-exit=1", f"--nodes={parallel.nnodes}", f"--ntasks={parallel.world_size}",
                f"--ntasks-per-node={parallel.nproc_per_node}", *os.environ.get(SRUN_EXTRA_ENV, "").split(),
                os.environ.get(WORKER_PYTHON_ENV) or sys.executable, "-m", module, *args]
    if parallel.nnodes > 1:
        raise LaunchError("parallel.nnodes > 1 needs parallel.launcher=srun (inside a Slurm allocation)")
    if parallel.world_size == 1:  # one worker: no agent needed (it dies with the driver's process group)
        return [sys.executable, "-m", module, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--signals-to-handle={TORCHRUN_SIGNALS}",
            f"--nproc-per-node={parallel.nproc_per_node}", "-m", module, *args]


def srun_rendezvous() -> dict[str, str]:
    """MASTER_ADDR/MASTER_PORT for srun workers: the first node's address, a port free on this node (the
    driver runs on the first node)."""
    from stepwise.parallel.runtime import free_port

    address = os.environ.get(MASTER_ADDR_ENV) or socket.gethostname()
    return {"MASTER_ADDR": address, "MASTER_PORT": str(free_port())}


def worker_threads(nproc_per_node: int) -> int:
    """Threads per worker process: $OMP_NUM_THREADS when set, else this node's cores shared evenly."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return int(os.environ["OMP_NUM_THREADS"])
    return max(1, (os.cpu_count() or 1) // nproc_per_node)


def worker_env(parallel: ParallelConfig) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items()
           if name not in RENDEZVOUS_VARIABLES and not name.startswith("TORCHELASTIC_")}
    if parallel.launcher == "srun":
        env.update(srun_rendezvous())
    env["OMP_NUM_THREADS"] = str(worker_threads(parallel.nproc_per_node))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "900")  # torchrun waits this long for the stop checkpoint
    env.setdefault("PYTHONWARNINGS", "ignore::UserWarning,ignore::FutureWarning,ignore::DeprecationWarning")
    return env


def launch(parallel: ParallelConfig, module: str, args: list[str], run_dir: str | os.PathLike) -> None:
    """Run the workers to the end; `Requeue` when they stopped on a signal or deadline, else LaunchError on
    failure. The requeue marker lives under `run_dir` (seen from every node)."""
    command = worker_command(parallel, module, args)
    markers = Path(run_dir) / ".launch"
    markers.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="launch-", dir=markers) as scratch:
        marker = Path(scratch) / "requeue"
        child = subprocess.Popen(command, env={**worker_env(parallel), REQUEUE_MARKER_ENV: str(marker)})
        in_main = threading.current_thread() is threading.main_thread()  # only the main thread may set handlers
        forwarded: list[int] = []

        def forward(number, frame):
            forwarded.append(number)
            child.send_signal(number)
            if callable(forwarding.get(number)):  # the driver's own stop request (pipeline.runner) sees it too
                forwarding[number](number, frame)

        forwarding = {number: signal.signal(number, forward) for number in (STOP_SIGNALS if in_main else ())}
        try:
            code = child.wait()
        finally:
            for number, handler in forwarding.items():
                signal.signal(number, handler)
        if marker.is_file() or code == REQUEUE_EXIT_CODE:
            raise Requeue(marker.read_text().strip() if marker.is_file() else "workers stopped for requeue")
        if forwarded and code != 0:  # workers without a stop handler (a sampling step, or past the training
            # loop) died of the forwarded signal: what they published stays, the rerun redoes the rest
            raise Requeue(f"workers stopped by {signal.Signals(forwarded[0]).name} (exit {code})")
    if code != 0:
        raise LaunchError(f"workers exited with code {code}: {' '.join(command)}")

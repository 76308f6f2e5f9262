"""One entry to start torch.distributed and megatron parallel state, from torchrun, Slurm or nothing.

`init_parallel(tp, pp, seed)` reads RANK/WORLD_SIZE/LOCAL_RANK (torchrun) or SLURM_PROCID/
SLURM_NTASKS/SLURM_LOCALID (srun), falls back to a single process, picks NCCL on GPU and gloo on CPU
(on CPU applying the CPU shim and keeping freed host memory mapped: `host_memory`), initialises
megatron's TP/PP/DP groups and seeds every RNG the way megatron expects (a failure seen by one rank
is raised on all of them by `stepwise.parallel.agree`).
"""
from __future__ import annotations

import atexit
import ctypes
import datetime
import os
import random
import signal
import socket
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from stepwise.parallel import cpu_shim
from stepwise.parallel.gloo_device import share_gloo_device
from stepwise.parallel.host_memory import keep_freed_host_memory


@dataclass(frozen=True)
class Layout:
    """Where this process sits: global rank/world and its TP/PP/DP coordinates."""

    rank: int
    world_size: int
    local_rank: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    device: torch.device

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def is_logging_rank(self) -> bool:
        """The one rank that prints progress: last pipeline stage, first TP and DP rank."""
        return self.is_last_stage and self.tp_rank == 0 and self.dp_rank == 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))  # every interface: srun workers on other nodes dial this node's address
        return sock.getsockname()[1]


def launch_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun, else Slurm, else a single process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "MASTER_ADDR" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def exit_with_launcher() -> None:
    """Under torchrun on Linux, have the kernel SIGKILL this worker when its torchrun agent dies.

    torchrun starts each worker in a session of its own, so a `stepwise run` killed with its process
    group (OOM killer, `kill -9`, a lost login shell) would leave the workers running for the whole
    collective timeout, holding GPU memory and writing into the run directory the re-run uses.
    (srun's workers are already killed with their step.)"""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL))
    if os.getppid() == 1:  # the agent died before the call: nobody will signal us
        os.kill(os.getpid(), signal.SIGKILL)


def init_distributed(timeout_minutes: int = 30) -> tuple[int, int, int]:
    """Start the default process group once per process; returns (rank, world, local_rank)."""
    rank, world_size, local_rank = launch_env()
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), local_rank
    exit_with_launcher()
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    if world_size == 1 and "RANK" not in os.environ:  # alone and not launched: a fresh local port, never
        os.environ["MASTER_ADDR"] = "127.0.0.1"  # one inherited from a parent's process group
        os.environ["MASTER_PORT"] = str(free_port())
    share_gloo_device()  # megatron's twenty-odd gloo groups: one polling thread, not one each
    dist.init_process_group(
        backend="nccl" if use_cuda else "gloo",
        init_method="env://",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )
    # Tear down while the interpreter is still whole: a gloo group left to interpreter finalisation can
    # abort the process (SIGABRT, "terminate called without an active exception"; pytorch#190489).
    atexit.unregister(shutdown)  # once, however often a process re-initialises
    atexit.register(shutdown)
    return rank, world_size, local_rank


def seed_everything(seed: int) -> None:
    """Seed python, numpy, torch and megatron's model-parallel RNG tracker (TP-rank aware)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    if torch.cuda.is_available():
        model_parallel_cuda_manual_seed(seed)
    else:
        cpu_shim.seed_cpu_tracker(seed, tp_rank)


def init_parallel(tp: int = 1, pp: int = 1, seed: int = 1234) -> Layout:
    """Initialise (or re-initialise) megatron parallel state for TP x PP x DP = world size."""
    from megatron.core import parallel_state

    rank, world_size, local_rank = init_distributed()
    if not torch.cuda.is_available():
        cpu_shim.install()  # here, not in init_distributed: a step that only needs a barrier never imports megatron
        keep_freed_host_memory()  # no caching allocator on CPU: steps would re-fault their activations' pages
    if world_size % (tp * pp):
        raise ValueError(f"world size {world_size} is not divisible by TP {tp} x PP {pp}")
    if (tp, pp) != _model_parallel_sizes(parallel_state):  # the same layout again (tests): the same groups
        if parallel_state.model_parallel_is_initialized():
            release_model_parallel()
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    seed_everything(seed)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return Layout(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        tp=tp,
        pp=pp,
        dp=world_size // (tp * pp),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        device=device,
    )


def _model_parallel_sizes(parallel_state) -> tuple[int, int] | None:
    if not parallel_state.model_parallel_is_initialized():
        return None
    return (parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size())


def release_model_parallel() -> None:
    """Destroy megatron's process groups. Its `destroy_model_parallel` only forgets them: their gloo
    threads (about 50 a layout) kept polling, and a process that re-initialised many times (the test
    suite's) spent most of a core on thousands of them."""
    from megatron.core import parallel_state

    created = [group for group in parallel_state._global_process_group_list or () if group is not None]
    parallel_state.destroy_model_parallel()  # destroys its gloo data-parallel groups itself
    for group in created:  # every group megatron created on this rank (None: the default group)
        try:
            dist.destroy_process_group(group)
        except ValueError:  # "Invalid process group": one of those already destroyed
            pass


def shutdown() -> None:
    """Tear down megatron state (when a process used it) and the process group (end of a stage)."""
    parallel_state = sys.modules.get("megatron.core.parallel_state")
    if parallel_state is not None and parallel_state.model_parallel_is_initialized():
        release_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()

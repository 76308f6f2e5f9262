"""Test-suite rules: CPU by default; `gpu` tests skip cleanly without CUDA; helpers to run torchrun."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (gpu marker)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(command: list[str], timeout: int, threads: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore", PYTHONPATH=str(REPO))
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n"
                             f"{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result


def run_python(script: str | Path, *args, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a worker script in a fresh single process (repo importable, warnings off)."""
    return _run([sys.executable, str(script), *map(str, args)], timeout, threads=2)


def run_torchrun(nproc: int, script: str | Path, *args, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `script` under torchrun with `nproc` CPU processes; raise with its output on failure."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={free_port()}", str(script), *map(str, args)]
    return _run(command, timeout, threads=1)

"""Start N worker processes as one torch.distributed job *without* torchrun, so each rank's exit code,
stdout and stderr can be checked and a signal can be sent to one rank alone."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import REPO, free_port


@dataclass
class Finished:
    rank: int
    returncode: int
    stdout: str
    stderr: str


def start_ranks(nproc: int, script: str | Path, *args, env: dict[str, str] | None = None) -> list[subprocess.Popen]:
    """Output goes to files (read back by `finish`), so a chatty rank never blocks on a full pipe."""
    port = str(free_port())
    logs = Path(tempfile.mkdtemp(prefix="ranks-"))
    procs = []
    for rank in range(nproc):
        rank_env = dict(os.environ, **(env or {}), RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank),
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1",
                        PYTHONWARNINGS="ignore", PYTHONPATH=str(REPO))
        with open(logs / f"{rank}.out", "w") as out, open(logs / f"{rank}.err", "w") as err:
            proc = subprocess.Popen([sys.executable, str(script), *map(str, args)], env=rank_env, cwd=REPO,
                                    stdout=out, stderr=err)
        proc.logs = logs / str(rank)  # type: ignore[attr-defined]
        procs.append(proc)
    return procs


def finish(procs: list[subprocess.Popen], timeout: float = 300) -> list[Finished]:
    """Wait for every rank (killing all on timeout) and collect their results."""
    deadline = time.monotonic() + timeout
    results = []
    for rank, proc in enumerate(procs):
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
                other.wait()
            raise AssertionError(f"rank {rank} timed out:\n{_read(proc, 'err')[-3000:]}") from None
        results.append(Finished(rank, proc.returncode, _read(proc, "out"), _read(proc, "err")))
    shutil.rmtree(Path(procs[0].logs).parent, ignore_errors=True)  # type: ignore[attr-defined]
    return results


def _read(proc: subprocess.Popen, stream: str) -> str:
    return Path(f"{proc.logs}.{stream}").read_text()  # type: ignore[attr-defined]


def run_ranks(nproc: int, script: str | Path, *args, env: dict[str, str] | None = None,
              timeout: float = 300) -> list[Finished]:
    return finish(start_ranks(nproc, script, *args, env=env), timeout)


def wait_for(predicate, procs: list[subprocess.Popen], timeout: float = 180, what: str = "condition") -> None:
    """Poll `predicate()` until true; fail early if a rank exits first."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if any(p.poll() is not None for p in procs):
            results = finish(procs, 30)
            raise AssertionError(f"a rank exited before {what}: " + "; ".join(
                f"rank {r.rank} rc={r.returncode} {r.stderr[-2000:]}" for r in results))
        if time.monotonic() > deadline:
            for p in procs:
                p.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)

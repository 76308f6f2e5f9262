"""The training loop: loss goes down, checkpoints publish atomically, and a resumed run equals an
uninterrupted one bitwise (model, optimizer, scheduler, data cursor and RNG all restored) — also when
the process was killed (-9) in the middle of publishing a checkpoint."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stepwise.checkpoint import layout
from stepwise.parallel.inject import KILL_ENV
from tests.conftest import REPO, run_python, run_torchrun

WORKER = Path(__file__).with_name("_train_worker.py")


def train(out: Path, steps: int, total: int) -> dict:
    run_python(WORKER, out, steps, total)
    return torch.load(out / "final.pt")


def killed_run(out: Path, kill_at: str) -> None:
    """Run 6 steps (checkpoints every 2) with STEPWISE_KILL_AT=kill_at; it must die of SIGKILL.

    It runs in its own session so the helper processes megatron's checkpoint writer started (orphaned
    by the kill, as they would be on a real crash) can be cleaned up; output goes to a file, not a
    pipe those helpers would hold open."""
    env = dict(os.environ, **{KILL_ENV: kill_at}, OMP_NUM_THREADS="2", PYTHONWARNINGS="ignore", PYTHONPATH=str(REPO))
    log = out.parent / f"{out.name}-{kill_at.replace(':', '-')}.log"
    with log.open("w") as handle:
        proc = subprocess.Popen([sys.executable, str(WORKER), out, "6", "6"], env=env, cwd=REPO, stdout=handle,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode = proc.wait(timeout=600)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert returncode == -signal.SIGKILL, log.read_text()[-3000:]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("straight")
    return root, train(root, 6, 6)


@pytest.mark.slow
def test_resume_equals_uninterrupted_and_checkpoints_are_published(straight, tmp_path):
    root, final = straight
    train(tmp_path / "resumed", 3, 6)  # stops after step 3; latest checkpoint: step 3
    assert layout.read_meta(layout.latest_iteration(tmp_path / "resumed"))["step"] == 3
    resumed = train(tmp_path / "resumed", 6, 6)
    for name in final:
        assert torch.equal(final[name], resumed[name]), name
    assert (root / "latest").read_text().strip() == "iter_0000006"
    assert not list(root.glob("*.tmp"))
    losses = [json.loads(line)["loss"] for line in (root / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and losses[-1] < losses[0]


@pytest.mark.slow
def test_kill_during_checkpoint_publication_keeps_the_previous_one_and_resumes_bitwise(straight, tmp_path):
    _, final = straight
    root = tmp_path / "crashed"
    killed_run(root, "staged:4")  # step 4's shards are written, nothing is published
    assert layout.latest_iteration(root).name == "iter_0000002"
    assert (root / "iter_0000004.tmp").is_dir() and not (root / "iter_0000004").exists()
    killed_run(root, "renamed:4")  # resumed from 2; iter_0000004 is in place, `latest` not yet moved
    assert layout.latest_iteration(root).name == "iter_0000002"
    assert (root / "iter_0000004").is_dir() and not (root / "iter_0000004.tmp").exists()
    resumed = train(root, 6, 6)  # resumes from 2 again, republishes 4 over the orphan, then 6
    for name in final:
        assert torch.equal(final[name], resumed[name]), name
    assert layout.latest_iteration(root).name == "iter_0000006"
    assert sorted(p.name for p in root.glob("iter_*")) == ["iter_0000004", "iter_0000006"]  # keep_last=2
    steps = [json.loads(line)["step"] for line in (root / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6], "lines of steps after the checkpoint are dropped on resume"


RESUME_LOSSES = ("sft", "critic_bce", "skywork_dapo", "dqo", "dqo+network")  # dqo: value head; +network: separate


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_every_loss_resumes_bitwise_at_tp2_and_pp2(tmp_path, tp, pp):
    """4 steps straight == 2 steps + save + new processes + 2 steps, for each loss, under torchrun."""
    names = ",".join(RESUME_LOSSES)
    run_torchrun(2, WORKER, tmp_path / "straight", 4, 4, tp, pp, names)
    run_torchrun(2, WORKER, tmp_path / "resumed", 2, 4, tp, pp, names)
    run_torchrun(2, WORKER, tmp_path / "resumed", 4, 4, tp, pp, names)
    for loss in RESUME_LOSSES:
        straight = torch.load(tmp_path / "straight" / loss / "final.pt")
        resumed = torch.load(tmp_path / "resumed" / loss / "final.pt")
        assert layout.read_meta(layout.latest_iteration(tmp_path / "resumed" / loss))["step"] == 4
        assert straight.keys() == resumed.keys()
        for name in straight:
            assert torch.equal(straight[name], resumed[name]), f"{loss} {name}"
        metrics = [json.loads(line) for line in (tmp_path / "straight" / loss / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics] == [1, 2, 3, 4] and all(m["grad_norm"] > 0 for m in metrics), loss


@pytest.mark.slow
def test_an_async_checkpoint_holds_the_exact_state_and_resumes_bitwise(straight, tmp_path, monkeypatch):
    """Periodic saves written by a forked process while training goes on (train.async_save): the run ends
    with the same model, and its step-4 checkpoint (published in the background) resumes to the same end."""
    root, final = straight
    monkeypatch.setenv("ASYNC_SAVE", "1")
    async_run = train(tmp_path / "async", 6, 6)
    assert all(torch.equal(final[name], async_run[name]) for name in final)
    published = sorted(layout.read_meta(p)["step"] for p in (tmp_path / "async").glob("iter_*") if p.is_dir())
    assert published == [4, 6] and not list((tmp_path / "async").glob("*.tmp"))
    resumed = tmp_path / "from_4"
    (resumed / "iter_0000004").parent.mkdir()
    os.rename(tmp_path / "async" / "iter_0000004", resumed / "iter_0000004")
    for name in ("hf", "metrics.jsonl"):
        if (tmp_path / "async" / name).exists():
            os.rename(tmp_path / "async" / name, resumed / name)
    (resumed / "latest").write_text("iter_0000004\n")
    monkeypatch.delenv("ASYNC_SAVE")
    again = train(resumed, 6, 6)
    for name, tensor in final.items():
        assert torch.equal(tensor, again[name]), name

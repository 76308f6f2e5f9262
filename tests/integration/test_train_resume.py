"""The training loop: loss goes down, checkpoints publish atomically, and a resumed run equals an
uninterrupted one bitwise (model, optimizer, scheduler, data cursor and RNG all restored)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from stepwise.checkpoint import layout
from tests.conftest import run_python

WORKER = Path(__file__).with_name("_train_worker.py")


def train(out: Path, steps: int, total: int) -> dict:
    run_python(WORKER, out, steps, total)
    return torch.load(out / "final.pt")


@pytest.mark.slow
def test_resume_equals_uninterrupted_and_checkpoints_are_published(tmp_path):
    straight = train(tmp_path / "straight", 6, 6)
    train(tmp_path / "resumed", 3, 6)  # stops after step 3; latest checkpoint: step 3
    assert layout.read_meta(layout.latest_iteration(tmp_path / "resumed"))["step"] == 3
    resumed = train(tmp_path / "resumed", 6, 6)
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    root = tmp_path / "straight"
    assert (root / "latest").read_text().strip() == "iter_0000006"
    assert not list(root.glob("*.tmp"))
    losses = [json.loads(line)["loss"] for line in (root / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and losses[-1] < losses[0]

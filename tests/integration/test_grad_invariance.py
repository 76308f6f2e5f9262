"""Splitting a global batch into micro-batches x accumulation x DP ranks gives the same gradient."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import run_python, run_torchrun

WORKER = Path(__file__).with_name("_grad_worker.py")


def _single_process(tmp_path: Path, micro_batch_size: int) -> dict:
    out = tmp_path / f"grads_{micro_batch_size}.pt"
    run_python(WORKER, out, micro_batch_size)
    return torch.load(out)


def _assert_same(a: dict, b: dict, tol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=tol, rtol=0), f"{name}: max diff {(a[name] - b[name]).abs().max()}"
    assert any(g.abs().sum() > 0 for g in a.values())


@pytest.mark.slow
def test_micro_batch_1_times_4_equals_micro_batch_4(tmp_path):
    _assert_same(_single_process(tmp_path, 4), _single_process(tmp_path, 1))


@pytest.mark.slow
def test_data_parallel_2_equals_one_process(tmp_path):
    reference = _single_process(tmp_path, 4)
    out = tmp_path / "grads_dp2.pt"
    run_torchrun(2, WORKER, out, 1)
    _assert_same(reference, torch.load(out))

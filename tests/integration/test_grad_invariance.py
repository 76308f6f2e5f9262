"""For every loss plugin: splitting a global batch into micro-batches x accumulation x DP ranks gives
the same gradient (plugins divide by a global normaliser; the engine sums)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stepwise import losses
from tests.conftest import run_python, run_torchrun
from tests.integration._grad_worker import NETWORK, cases

WORKER = Path(__file__).with_name("_grad_worker.py")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("grads") / "grads_4.pt"
    run_python(WORKER, out, 4)
    return torch.load(out)


def _assert_same(a: dict, b: dict, tol: float = 1e-6) -> None:
    """Equal to `tol` relative to the gradient's scale (fp32 sums in another order), at least 1e-6 absolute."""
    assert a.keys() == b.keys() == set(cases())
    for plugin in a:
        assert a[plugin].keys() == b[plugin].keys(), plugin
        for name in a[plugin]:
            diff = (a[plugin][name] - b[plugin][name]).abs().max()
            scale = max(1.0, a[plugin][name].abs().max().item())
            assert diff <= tol * scale, f"{plugin} {name}: max diff {diff} at scale {scale}"
        assert any(g.abs().sum() > 0 for g in a[plugin].values()), f"{plugin}: no gradient at all"


@pytest.mark.slow
def test_micro_batch_1_times_4_equals_micro_batch_4(reference, tmp_path):
    run_python(WORKER, tmp_path / "grads_1.pt", 1)
    _assert_same(reference, torch.load(tmp_path / "grads_1.pt"))


@pytest.mark.slow
def test_data_parallel_2_equals_one_process(reference, tmp_path):
    run_torchrun(2, WORKER, tmp_path / "grads_dp2.pt", 1)
    _assert_same(reference, torch.load(tmp_path / "grads_dp2.pt"))


def test_every_plugin_is_covered():
    assert {"sft", "skywork_dapo", "critic_bce", "dqo", "dro", "dpo", "kto"} <= set(losses.names())
    assert {"dqo", "dqo" + NETWORK, "dro", "dro" + NETWORK} <= set(cases())

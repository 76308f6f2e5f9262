"""For every loss plugin: splitting a global batch into micro-batches x accumulation x DP ranks gives
the same gradient (plugins divide by a global normaliser; the engine sums)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stepwise import losses
from tests.conftest import run_python, run_torchrun
from tests.integration._grad_worker import GLOBAL_BATCH, NETWORK, TINY, cases
from tests.tolerance import gradient_bound, within

WORKER = Path(__file__).with_name("_grad_worker.py")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("grads") / "grads_4.pt"
    run_python(WORKER, out, 4)
    return torch.load(out)


# The most tokens one weight gradient sums over: GLOBAL_BATCH rows (pairs: two sequences) of <= 32 tokens.
BATCH_TOKENS = 2 * GLOBAL_BATCH * 32


def _assert_same(a: dict, b: dict, what: str) -> None:
    """Equal up to fp32 summation order (tests/tolerance.py), relative to the plugin's largest gradient
    entry; a wrong normaliser (per micro-batch or per rank instead of global) is off by O(1) of it."""
    assert a.keys() == b.keys() == set(cases())
    for plugin in a:
        assert a[plugin].keys() == b[plugin].keys(), plugin
        assert any(g.abs().sum() > 0 for g in a[plugin].values()), f"{plugin}: no gradient at all"
        scale = max(g.abs().max().item() for g in a[plugin].values())
        observed = max((a[plugin][name] - b[plugin][name]).abs().max().item() for name in a[plugin])
        within(f"{plugin} gradient, {what}", observed, gradient_bound(scale, TINY, BATCH_TOKENS))


@pytest.mark.slow
def test_micro_batch_1_times_4_equals_micro_batch_4(reference, tmp_path):
    run_python(WORKER, tmp_path / "grads_1.pt", 1)
    _assert_same(reference, torch.load(tmp_path / "grads_1.pt"), "micro-batch 1 x 4 vs 4")


@pytest.mark.slow
def test_data_parallel_2_equals_one_process(reference, tmp_path):
    run_torchrun(2, WORKER, tmp_path / "grads_dp2.pt", 1)
    _assert_same(reference, torch.load(tmp_path / "grads_dp2.pt"), "DP 2 vs 1 process")


def test_every_plugin_is_covered():
    assert {"sft", "skywork_dapo", "critic_bce", "dqo", "dro", "dpo", "kto"} <= set(losses.names())
    assert {"dqo", "dqo" + NETWORK, "dro", "dro" + NETWORK} <= set(cases())

"""Shared-prefix packing is exact: `skywork_dapo` gradients and the advantage stage's `policy` scores
(summed action log-probs) of one state-wise global batch agree packed and unpacked, within the fp32
reordering bound of tests/tolerance.py, at TP 1, TP 2 and PP 2."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import run_python, run_torchrun
from tests.integration._grad_worker import TINY
from tests.tolerance import gradient_bound, output_bound, within

WORKER = Path(__file__).with_name("_packing_worker.py")


def _check(result: dict, what: str) -> None:
    packed_tokens, unpacked_tokens = result["tokens"]
    assert packed_tokens < unpacked_tokens, result["tokens"]
    observed, scale = result["gradient"]
    assert scale > 0, "no gradient at all"
    # a weight gradient sums over at most the unpacked rows' tokens
    within(f"skywork_dapo gradient packed vs unpacked, {what}", observed, gradient_bound(scale, TINY, unpacked_tokens))
    observed, scale = result["score"]
    assert scale > 0
    within(f"policy scores packed vs unpacked, {what}", observed, output_bound(scale, TINY, unpacked_tokens))


def test_packing_is_exact_at_tp1(tmp_path):
    run_python(WORKER, tmp_path / "tp1.pt", 1, 1)
    result = torch.load(tmp_path / "tp1.pt")
    assert result["scores"] == 12
    _check(result, "TP 1")


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_packing_is_exact_at_tp2_and_pp2(tmp_path, tp, pp):
    run_torchrun(2, WORKER, tmp_path / "out.pt", tp, pp)
    _check(torch.load(tmp_path / "out.pt"), f"TP {tp} PP {pp}")

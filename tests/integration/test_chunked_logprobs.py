"""Chunked log-probs (only at the positions a loss reads) equal the full fp32 form at TP 1 and TP 2;
the engine's and the scorer's hidden-state form (no whole logits; the output weight's gradient added
straight into DDP's main_grad, once) equals their logits form at TP 1, TP 2 and PP 2, tied and untied."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import run_python, run_torchrun
from tests.integration._grad_worker import TINY
from tests.tolerance import gradient_bound, output_bound, within

WORKER = Path(__file__).with_name("_logprobs_worker.py")
HIDDEN_FORM_WORKER = Path(__file__).with_name("_hidden_form_worker.py")


@pytest.mark.parametrize("tp", [1, 2])
def test_chunked_logprobs_and_gradients_match_the_full_form(tp):
    output = run_torchrun(tp, WORKER, timeout=120).stdout
    for rank in range(tp):
        assert f"rank {rank}: chunked log-probs match the full form at TP {tp}" in output


def _check_hidden_form(results: dict, what: str) -> None:
    assert set(results) == {f"tie={tie},{case}" for tie in (True, False) for case in ("skywork_dapo", "dqo")}
    for name, result in results.items():
        # a weight gradient sums over the batch's tokens (rows x padded length at most)
        for part in ("gradient", "output_weight"):
            observed, scale = result[part]
            assert scale > 0, f"{name}: no {part} gradient"
            # the output weight's main_grad added twice (DDP's hook and the op) would be off by 1x its scale
            within(f"{name} {part} hidden vs logits form, {what}", observed,
                   gradient_bound(scale, TINY, 2 * result["tokens"]))
        # both forms added the output weight's gradient into main_grad themselves, the hidden form's op and
        # (under gradient accumulation fusion, as every engine is built) megatron's output layer
        assert result["added_to_main_grad"] == (1.0, 1.0), f"{name}: {result['added_to_main_grad']}"
        if result["score"] is not None:
            observed, scale = result["score"]
            assert scale > 0 and result["scores"] > 0
            within(f"{name} policy/tokens scores hidden vs logits form, {what}", observed,
                   output_bound(scale, TINY, result["tokens"]))


def test_hidden_form_matches_the_logits_form_at_tp1(tmp_path):
    run_python(HIDDEN_FORM_WORKER, tmp_path / "out.pt", 1, 1)
    _check_hidden_form(torch.load(tmp_path / "out.pt"), "TP 1")


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_hidden_form_matches_the_logits_form_at_tp2_and_pp2(tmp_path, tp, pp):
    run_torchrun(2, HIDDEN_FORM_WORKER, tmp_path / "out.pt", tp, pp)
    _check_hidden_form(torch.load(tmp_path / "out.pt"), f"TP {tp} PP {pp}")

"""Packing is exact: `skywork_dapo` gradients and the advantage stage's `policy` scores (summed action
log-probs) of one state-wise global batch (shared-prefix packed), `sft` / `dpo` / `kto` / `dqo` / `dro`
gradients and `critic_bce` gradients and values of one sequence-packed global batch, agree packed and
unpacked within the fp32 reordering bound of
tests/tolerance.py, at TP 1, TP 2 and PP 2. Each prints its tokens per global batch packed vs unpacked."""
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
    print(f"[packing] {what}: tokens packed {packed_tokens} vs unpacked {unpacked_tokens}, computed with "
          f"padding {result['computed'][0]} vs {result['computed'][1]}, micro-batches {result['rows'][0]} vs {result['rows'][1]}")
    assert packed_tokens <= unpacked_tokens, result["tokens"]  # equal unless samples share a prefix
    assert result["computed"][0] < result["computed"][1], result["computed"]
    observed, scale = result["gradient"]
    assert scale > 0, "no gradient at all"
    # a weight gradient sums over at most the unpacked rows' tokens
    within(f"gradient packed vs unpacked, {what}", observed, gradient_bound(scale, TINY, unpacked_tokens))
    if result["score"] is not None:
        observed, scale = result["score"]
        assert scale > 0
        within(f"scores packed vs unpacked, {what}", observed, output_bound(scale, TINY, unpacked_tokens))


def test_packing_is_exact_at_tp1(tmp_path):
    run_python(WORKER, tmp_path / "tp1.pt", 1, 1)
    result = torch.load(tmp_path / "tp1.pt")
    assert result["scores"] == 12
    _check(result, "skywork_dapo TP 1")


@pytest.mark.parametrize("case", ["sft", "dpo", "kto", "dqo", "dro", "dqo+network", "critic_bce"])
def test_sequence_packing_is_exact_at_tp1(tmp_path, case):
    run_python(WORKER, tmp_path / "tp1.pt", 1, 1, case)
    result = torch.load(tmp_path / "tp1.pt")
    assert result["tokens"][0] < result["tokens"][1] or case != "dpo"  # a pair's prompt once
    # several packed rows to a micro-batch (dpo: a pair alone fills most of a row of the longest pair;
    # kto: each unpacked micro-batch packed on its own, as many of them)
    fewer = result["rows"][0] < result["rows"][1]
    assert fewer or (case in ("dpo", "kto") and result["rows"][0] == result["rows"][1]), result["rows"]
    _check(result, f"{case} TP 1")


@pytest.mark.parametrize("case", ["skywork_dapo", "sft"])
def test_packing_is_exact_through_the_te_spec_s_core_attention(tmp_path, case):
    """The TE spec's core attention (`te_packed_attention`) over a stand-in for TE's class, in a whole
    model: shared-prefix rows' masks reach SDPA, sequence packs reach TE's class as THD sequences (the
    stand-in's causal attention over whole rows would let each sample see the ones before it)."""
    run_python(WORKER, tmp_path / "te.pt", 1, 1, case, "te-stand-in")
    result = torch.load(tmp_path / "te.pt")
    assert result["core_attention"] == "StandInTEAttentionWithMaskedSDPA"
    assert case != "sft" or result["thd_calls"] > 0
    _check(result, f"{case} TE spec's core attention (stand-in)")


@pytest.mark.slow
@pytest.mark.parametrize("case", ["skywork_dapo", "sft", "dpo", "kto", "dqo", "critic_bce"])  # dro: dqo's batches
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_packing_is_exact_at_tp2_and_pp2(tmp_path, tp, pp, case):
    run_torchrun(2, WORKER, tmp_path / "out.pt", tp, pp, case)
    result = torch.load(tmp_path / "out.pt")
    assert case == "skywork_dapo" or result["rows"][0] <= result["rows"][1], result["rows"]
    _check(result, f"{case} TP {tp} PP {pp}")

"""Chunked log-probs (only at the positions a loss reads) equal the full fp32 form at TP 1 and TP 2."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_torchrun

WORKER = Path(__file__).with_name("_logprobs_worker.py")


@pytest.mark.parametrize("tp", [1, 2])
def test_chunked_logprobs_and_gradients_match_the_full_form(tp):
    output = run_torchrun(tp, WORKER, timeout=120).stdout
    for rank in range(tp):
        assert f"rank {rank}: chunked log-probs match the full form at TP {tp}" in output

"""A critic exports as HF *ForTokenClassification (num_labels=1) with the same values, and its
HF -> megatron -> HF round trip is bitwise."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stepwise.convert.hf_io import read_hf_state
from tests.conftest import REPO, run_python
from tests.integration._critic_worker import HF
from tests.tolerance import logits_bound, within

WORKER = Path(__file__).with_name("_critic_worker.py")


@pytest.mark.slow
def test_critic_export_matches_and_round_trips(tmp_path):
    from transformers import AutoModelForTokenClassification

    run_python(WORKER, tmp_path)  # random critic checkpoint + its head logits on fixed tokens
    run_python(REPO / "conversion/megatron_to_hf.py", "--ckpt", tmp_path / "critic", "--out", tmp_path / "hf")
    model = AutoModelForTokenClassification.from_pretrained(str(tmp_path / "hf"))
    assert model.config.num_labels == 1 and type(model).__name__ == "Qwen2ForTokenClassification"
    ids, expected = torch.load(tmp_path / "logits.pt")
    with torch.no_grad():
        got = model(input_ids=ids).logits[..., 0]
    # a critic's output is a [seq, 1] "logit": the same summation-order bound (tests/tolerance.py)
    within("critic export vs megatron", float((got - expected).abs().max()), logits_bound(expected[..., None], HF))
    run_python(REPO / "conversion/hf_to_megatron.py", "--hf", tmp_path / "hf", "--out", tmp_path / "again")
    run_python(REPO / "conversion/megatron_to_hf.py", "--ckpt", tmp_path / "again", "--out", tmp_path / "hf2")
    first, second = read_hf_state(tmp_path / "hf"), read_hf_state(tmp_path / "hf2")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)

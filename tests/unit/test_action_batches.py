"""State-wise batching for step-level policy losses: whole states per global batch, padding rows
carry no loss, and the order resumes."""
from __future__ import annotations

import random

import pytest
import torch

from stepwise import losses
from stepwise.train.action_data import PAD_INDEX, ActionBatches, StatewiseOrder


def sequences(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for state in range(40):
        for _ in range(rng.randint(1, 5)):
            n = rng.randint(4, 10)
            out.append({"ids": [rng.randint(1, 30) for _ in range(n)], "mask": [0, 0] + [1] * (n - 2),
                        "state": f"s{state}", "advantage": rng.uniform(-1, 1), "ref_logp": -rng.random()})
    return out


def test_no_state_is_split_across_global_batches_and_every_action_appears_once():
    data = sequences()
    order = ActionBatches(data, 0, 32, 4).make_order(global_batch_size=8, seed=1)
    seen = []
    for _ in range(order.steps_per_epoch):
        batch = order.next_global_batch()
        assert len(batch) == 8
        real = [i for i in batch if i != PAD_INDEX]
        for state in {data[i]["state"] for i in real}:
            members = [i for i, s in enumerate(data) if s["state"] == state]
            assert set(members) <= set(real), f"state {state} split"
        seen += real
    assert sorted(seen) == list(range(len(data)))


def test_order_is_seeded_and_resumes():
    data = sequences()
    first = ActionBatches(data, 0, 32, 4).make_order(8, seed=2)
    run = [first.next_global_batch() for _ in range(first.steps_per_epoch + 3)]
    resumed = ActionBatches(data, 0, 32, 4).make_order(8, seed=2)
    resumed.load_state_dict({**first.state_dict(), "consumed": 5})
    assert [resumed.next_global_batch() for _ in range(len(run) - 5)] == run[5:]


def test_a_state_larger_than_the_global_batch_is_an_error():
    with pytest.raises(ValueError, match="more than global_batch_size"):
        StatewiseOrder([[0, 1, 2]], global_batch_size=2, seed=0)


def test_padding_rows_add_no_loss_and_normaliser_counts_real_actions():
    data = sequences()
    batches = ActionBatches(data, 0, 32, 8)
    indices = [0, 1, PAD_INDEX, PAD_INDEX]
    (micro,) = batches.micro_batches(indices, 0, 1)
    assert micro["normalizer"].item() == 2
    plugin = losses.get("skywork_dapo")
    options = plugin.parse_options({"beta": 0.1})
    logprobs = -torch.rand(micro["input_ids"].shape)
    full, _ = plugin.compute(options, micro, logprobs)
    real = {k: (v[:2] if v.dim() else v) for k, v in micro.items()}
    only_real, _ = plugin.compute(options, real, logprobs[:2])
    assert full.item() == pytest.approx(only_real.item())

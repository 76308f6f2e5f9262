"""Shared-prefix packing layout (`stepwise.train.prefix_packing`), the packed `action` micro-batches,
the SDPA mask path and rope at given position ids."""
from __future__ import annotations

import pytest
import torch

from stepwise import losses
from stepwise.train.action_data import PAD_INDEX, ActionBatches
from stepwise.train.prefix_packing import collate_row, pack_rows


def test_a_block_holds_the_prefix_once_and_each_action_after_it():
    (row,) = pack_rows([([1, 2, 3], [4, 5]), ([1, 2, 3], [6])], budget=16)
    batch = collate_row(row, 8, pad_id=0)
    # shared [1, 2], then segments [3, 4] -> [4, 5] and [3] -> [6]; padding after
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 3, 0, 0, 0]]
    assert batch["labels"].tolist() == [[2, 3, 4, 5, 6, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 2, 0, 1, 2]]
    assert batch["loss_mask"].tolist() == [[0, 0, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 0, 0, 0]]
    sees = ~batch["attention_mask"][0, 0]
    assert sees[4].tolist() == [True, True, False, False, True, False, False, False]  # prefix + itself
    assert sees[3].tolist() == [True, True, True, True, False, False, False, False]
    assert sees[7].tolist() == [False] * 5 + [True] * 3  # padding sees padding only, never nothing


def test_rows_respect_the_budget_keep_order_and_separate_states():
    items = [([1] * 5, [2] * 3), ([1] * 5, [3] * 3), ([7] * 2, [8] * 4), ([7] * 2, [9] * 4)]
    rows = pack_rows(items, budget=13)
    assert [[block.items for block in row] for row in rows] == [[[0, 1]], [[2, 3]]]  # 4+3+3=10; +1+4 > 13
    batch = collate_row(rows[1], 10, pad_id=0)
    assert batch["items"].tolist() == [2, 3]
    sees = ~batch["attention_mask"][0, 0]
    assert not sees[5:9, 1:5].any()  # the second action never sees the first
    with pytest.raises(ValueError, match="exceed the row budget"):
        pack_rows([([1] * 10, [2] * 10)], budget=12)


def records() -> list[dict]:
    out = []
    for state, prefix in enumerate([[5, 6, 7], [8, 9]]):
        for k in range(3):
            action = [10 + k] * (k + 1)
            out.append({"ids": prefix + action, "mask": [0] * len(prefix) + [1] * len(action), "state": f"s{state}",
                        "advantage": 0.1 * k, "ref_logp": -1.0 - k})
    return out


def test_packed_micro_batches_sum_each_actions_logprobs_like_unpacked_rows():
    data = records()
    indices = list(range(6)) + [PAD_INDEX, PAD_INDEX]
    plain = ActionBatches(data, 0, 16, 8).micro_batches(indices, 0, 1)
    packed = ActionBatches(data, 0, 16, 8, pack=True).micro_batches(indices, 0, 1)
    assert len(packed) == 1 and packed[0]["loss_mask"].shape[0] == 6
    # a token's "log-prob" as a function of (label, position); seeded, not the global RNG
    logprob_of = torch.randn(64, generator=torch.Generator().manual_seed(0))

    def token_table(batch):
        return logprob_of[(batch["labels"] * 3 + batch["position_ids"]) % 64]

    def per_action(batch):
        return (token_table(batch) * batch["loss_mask"]).sum(dim=1)

    assert torch.equal(per_action(plain[0])[:6], per_action(packed[0]))
    plugin = losses.get("skywork_dapo")
    options = plugin.parse_options({})
    for batch in (plain[0], packed[0]):
        assert batch["normalizer"].item() == 6
    plain_loss, _ = plugin.compute(options, plain[0], token_table(plain[0]))
    packed_loss, packed_metrics = plugin.compute(options, packed[0], token_table(packed[0]))
    assert torch.allclose(plain_loss, packed_loss, rtol=1e-6, atol=0)  # the same 6 terms; pad rows add 0
    assert packed_metrics["actions"].item() == 6  # real actions, no padding rows


def test_packed_rows_are_dealt_to_dp_ranks_and_an_empty_rank_gets_an_empty_row():
    data = records()
    batches = ActionBatches(data, 0, 8, 8, pack=True)  # budget 8: one state per row
    rows = [batches.micro_batches(list(range(6)), rank, 3) for rank in range(3)]
    assert [len(r) for r in rows] == [1, 1, 1]  # two rows for three ranks: rank 0's row is empty
    assert [r[0]["loss_mask"].shape[0] for r in rows] == [0, 3, 3]
    lengths = {m["input_ids"].shape[1] for r in rows for m in r}
    assert len(lengths) == 1  # one padded length for the global batch (pipeline schedules need it)
    assert sum(m["loss_mask"].shape[0] for r in rows for m in r) == 6
    assert batches.tokens(list(range(6))) == (2 + 1 + 2 + 3) + (1 + 1 + 2 + 3)


def test_sdpa_with_the_causal_mask_equals_the_causal_default():
    from stepwise.models.attention import sdpa

    q, k, v = (torch.randn(2, 4, 7, 8) for _ in range(3))
    causal_mask = ~torch.ones(7, 7, dtype=torch.bool).tril()[None, None].expand(2, 1, 7, 7)
    assert torch.allclose(sdpa(q, k, v, causal_mask, 0.0, None), sdpa(q, k, v, None, 0.0, None), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="boolean"):
        sdpa(q, k, v, causal_mask.float(), 0.0, None)


def test_rope_at_plain_positions_is_bitwise_the_table():
    from stepwise.models.rope_positions import gather_rotary

    table = torch.randn(10, 1, 1, 6)
    positions = torch.arange(10).expand(3, -1)
    gathered = gather_rotary(table, positions)
    assert gathered.shape == (10, 3, 1, 6)
    assert torch.equal(gathered, table.expand(10, 3, 1, 6))
    assert torch.equal(gather_rotary(table, torch.tensor([[4, 2]]))[:, 0], table[[4, 2], 0])

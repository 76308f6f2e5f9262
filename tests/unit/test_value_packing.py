"""Sequence packing of critic solution records (`stepwise.train.value_packing` through `ValueBatches`):
rows in record order within the unpacked row length, values read back in record order (what the scorer
regroups by), each solution attending to itself only, DP ranks dealt disjoint rows."""
from __future__ import annotations

import pytest
import torch

from stepwise.train.value_data import ValueBatches
from stepwise.train.value_packing import collate_solution_rows, pack_solutions


def solutions(lengths: list[int]) -> list[dict]:
    """Records of `lengths` tokens, states read at every other token and the last, targets numbering them."""
    out, count = [], 0
    for n in lengths:
        reads = sorted(set(range(0, n, 2)) | {n - 1})
        out.append({"ids": list(range(1, n + 1)), "positions": reads,
                    "targets": [float(count + k) for k in range(len(reads))]})
        count += len(reads)
    return out


def test_rows_keep_the_records_order_and_the_budget():
    rows = pack_solutions(solutions([5, 3, 7, 2, 8, 1]), budget=8)
    assert [[len(s["ids"]) for s in row] for row in rows] == [[5, 3], [7], [2], [8], [1]]
    with pytest.raises(ValueError, match="solution 0 of 9 tokens exceeds the row budget 8"):
        pack_solutions(solutions([9]), budget=8)


def test_values_read_row_by_row_come_back_in_record_order():
    records = solutions([5, 3, 7, 2, 8, 1, 4, 4])
    batches = ValueBatches(records, 0, 16, micro_batch_size=2, pack=True)
    indices = list(range(len(records)))
    micro = batches.micro_batches(indices, 0, 1)
    assert len(micro) == batches.micro_batch_count(indices)
    assert micro[0]["input_ids"].shape[1] == batches.length(records)  # the unpacked rows' length
    read = [t for batch in micro for row, mask in zip(batch["value_target"], batch["value_mask"])
            for t in row[mask.bool()].tolist()]
    assert read == [t for record in records for t in record["targets"]]
    unpacked = ValueBatches(records, 0, 16, micro_batch_size=2).micro_batches(indices, 0, 1)
    assert sum(b["input_ids"].numel() for b in micro) < sum(b["input_ids"].numel() for b in unpacked)
    assert all(torch.equal(b["normalizer"], unpacked[0]["normalizer"]) for b in micro)


def test_each_solution_sees_itself_only_with_positions_from_zero():
    batch = collate_solution_rows([solutions([3, 2])], length=6, pad_id=0)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0]]
    visible = ~batch["attention_mask"][0, 0]
    expected = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                             [0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(visible, expected)
    assert batch["value_mask"].tolist() == [[1, 0, 1, 1, 1, 0]]


def test_dp_ranks_get_disjoint_rows_and_an_empty_rank_a_row_without_values():
    records = solutions([5, 3, 7])
    batches = ValueBatches(records, 0, 8, micro_batch_size=1, pack=True)
    per_rank = [batches.micro_batches([0, 1, 2], rank, 4) for rank in range(4)]
    values = [int(b["value_mask"].sum()) for rank in per_rank for b in rank]
    assert sum(values) == sum(len(r["targets"]) for r in records)
    assert 0 in values  # two rows over four ranks: the others get an empty row


def test_a_batch_no_two_solutions_of_which_share_a_row_stays_unpacked():
    """Rows of one solution each: the unpacked micro-batches, no mask (causal attention, TE's fused kernel)."""
    records = solutions([7, 6, 8])
    packed = ValueBatches(records, 0, 16, micro_batch_size=2, pack=True)
    unpacked = ValueBatches(records, 0, 16, micro_batch_size=2)
    for a, b in zip(packed.micro_batches([0, 1, 2], 0, 1), unpacked.micro_batches([0, 1, 2], 0, 1), strict=True):
        assert a.keys() == b.keys() and "attention_mask" not in a
        assert all(torch.equal(a[key], b[key]) for key in a)
    assert packed.micro_batch_count([0, 1, 2]) == 2

"""Branched `values` records (a state's next states, their shared prefix once): the record a state's
next states make, rows filled to the budget, the attention and positions of a packed row, the count
of micro-batches, and bad records."""
from __future__ import annotations

import pytest
import torch

from stepwise.data.jsonl import DataError
from stepwise.train.branch_packing import collate_branch_row, pack_branches
from stepwise.train.value_data import ValueBatches, branched_record, tokenize_states


def test_branched_record_shares_the_longest_prefix_and_leaves_each_branch_a_token():
    record = branched_record([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3, 4]])
    assert record == {"ids": [1, 2], "branches": [[3, 4], [5], [3, 4]], "mc": [0.0, 0.0, 0.0]}
    assert branched_record([[7, 8], [7, 8]])["branches"] == [[8], [8]]  # duplicates keep a token each
    assert branched_record([[1, 2], [3, 4]])["ids"] == []


def test_rows_fill_the_budget_and_a_record_continues_on_the_next_row():
    sequences = [{"ids": [1, 2, 3], "branches": [[4, 5], [6], [7, 8, 9]], "targets": [0.1, 0.2, 0.3]},
                 {"ids": [9], "branches": [[1]], "targets": [0.4]}]
    rows = pack_branches(sequences, budget=8)
    assert [[(b.prefix, b.branches) for b in row] for row in rows] == [
        [([1, 2, 3], [[4, 5], [6]])], [([1, 2, 3], [[7, 8, 9]]), ([9], [[1]])]]
    with pytest.raises(ValueError, match="sequence 0"):
        pack_branches(sequences, budget=5)


def test_a_packed_row_reads_each_branch_at_its_last_token_seeing_its_prefix_and_itself():
    (row,) = pack_branches([{"ids": [5, 6], "branches": [[7, 8], [9]], "targets": [0.25, 0.5]}], budget=16)
    batch = collate_branch_row(row, 8, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 2, 0, 1, 2]]
    assert batch["value_mask"].tolist() == [[0, 0, 0, 1, 1, 0, 0, 0]]
    assert batch["value_target"][0, [3, 4]].tolist() == [0.25, 0.5]
    sees = ~batch["attention_mask"][0, 0]
    assert sees[4].tolist() == [True, True, False, False, True, False, False, False]  # branch 2: prefix, itself
    assert sees[3].tolist() == [True, True, True, True, False, False, False, False]


def test_value_batches_of_branched_records_count_and_deal_packed_rows():
    records = [branched_record([[1, 2, 3, k] for k in range(4, 8)]), branched_record([[9, 9, 1], [9, 9, 2, 2]])]
    batches = ValueBatches(tokenize_states(records, None, 8), 0, 8, 2)
    micro = batches.micro_batches([0, 1], 0, 1)
    assert batches.micro_batch_count([0, 1]) == len(micro) == 2
    assert [int(m["value_mask"].sum()) for m in micro] == [4, 2] and micro[0]["normalizer"].item() == 6
    assert {tuple(m["input_ids"].shape) for m in micro} == {(1, 8)}
    dealt = [batches.micro_batches([0, 1], rank, 3) for rank in range(3)]  # 2 rows, 3 DP ranks: one gets an empty row
    assert [[int(m["value_mask"].sum()) for m in micro] for micro in dealt] == [[0], [4], [2]]


@pytest.mark.parametrize("record,message", [
    ({"ids": [1], "branches": [[2], []], "mc": [0.0, 0.0]}, "branch 1"),
    ({"ids": [1], "branches": [[2]], "mc": [0.0, 0.0]}, "2 MC values for 1 branches"),
    ({"ids": [1] * 8, "branches": [[2]], "mc": [0.0]}, "9 tokens exceed"),
])
def test_bad_branched_records_are_named(record, message):
    with pytest.raises(DataError, match=message):
        tokenize_states([record], None, 8, source="next.jsonl")


def test_a_file_mixing_both_forms_is_refused():
    sequences = tokenize_states([{"ids": [1, 2], "ends": [2], "mc": [0.0]}, branched_record([[1, 2], [1, 3]])], None, 8)
    with pytest.raises(DataError, match="mix the branched form"):
        ValueBatches(sequences, 0, 8, 2)

"""Data order, DP slicing, collation and micro-batch splitting."""
from __future__ import annotations

import pytest
import torch

from stepwise.train.batches import DataOrder, collate_sft, dp_slice, pad_length, split_micro_batches


def test_order_is_seeded_and_resumable():
    first = DataOrder(size=100, global_batch_size=8, seed=3)
    batches = [first.next_global_batch() for _ in range(30)]  # crosses epochs (12 per epoch)
    resumed = DataOrder(size=100, global_batch_size=8, seed=3)
    resumed.load_state_dict(DataOrder(size=100, global_batch_size=8, seed=3, consumed=8 * 17).state_dict())
    assert [resumed.next_global_batch() for _ in range(13)] == batches[17:]
    assert batches[0] != DataOrder(size=100, global_batch_size=8, seed=4).next_global_batch()


def test_epoch_covers_each_sample_once_and_tail_is_dropped():
    order = DataOrder(size=20, global_batch_size=6, seed=0)
    epoch = sum((order.next_global_batch() for _ in range(order.steps_per_epoch)), [])
    assert len(epoch) == 18 and len(set(epoch)) == 18


def test_resume_rejects_a_different_dataset():
    with pytest.raises(ValueError, match="data order mismatch"):
        DataOrder(10, 2, 0).load_state_dict(DataOrder(12, 2, 0).state_dict())


def test_dp_slices_partition_the_global_batch_in_order():
    indices = list(range(12))
    assert sum((dp_slice(indices, r, 3) for r in range(3)), []) == indices


def test_collate_shifts_targets_and_masks_the_prompt():
    batch = collate_sft([{"ids": [5, 6, 7, 8], "mask": [0, 0, 1, 1]}], length=pad_length([3], 64), pad_id=0)
    assert batch["input_ids"].shape == (1, 8)
    assert batch["input_ids"][0, :3].tolist() == [5, 6, 7]
    assert batch["labels"][0, :3].tolist() == [6, 7, 8]
    assert batch["loss_mask"][0].tolist() == [0, 1, 1, 0, 0, 0, 0, 0]


def test_split_shares_scalars():
    batch = {"input_ids": torch.zeros(4, 3), "normalizer": torch.tensor(9.0)}
    parts = split_micro_batches(batch, 1)
    assert len(parts) == 4 and all(p["normalizer"].item() == 9.0 for p in parts)

"""Batch builders of the DQO family: `trajectory` (dqo, dro), `pair` (dpo), `labelled` (kto): where the
per-token and per-sequence numbers land, DP slicing, normalisers, record errors, and that each
builder's micro-batches feed its plugin."""
from __future__ import annotations

import pytest
import torch

from stepwise import losses
from stepwise.data.jsonl import DataError
from stepwise.train.labelled_data import LabelledBatches, tokenize_labelled
from stepwise.train.pair_data import PairBatches, tokenize_pairs
from stepwise.train.trajectory_data import TrajectoryBatches, tokenize_trajectories


class CharTokenizer:
    """One id per character ('a' -> 3 ...); 0 pads, 1 is eos."""

    pad_token_id, eos_token_id = 0, 1

    def __call__(self, text, add_special_tokens=False):
        encode = lambda s: [ord(c) - ord("a") + 3 for c in s]
        return {"input_ids": [encode(t) for t in text] if isinstance(text, list) else encode(text)}


def trajectory(prompt="ab", response="cd", reward=1.0, **extra) -> dict:
    n = len(response) + 1
    return {"prompt": prompt, "response": response, "reward": reward,
            "behaviour_logp": [-0.1 * (i + 1) for i in range(n)], "ref_logp": [-0.2 * (i + 1) for i in range(n)], **extra}


def test_trajectory_numbers_sit_at_the_positions_whose_label_is_their_token():
    records = [trajectory(process_rewards=[0.1, 0.0, 0.2]), trajectory(prompt="a", response="bcd", reward=0.0)]
    sequences = tokenize_trajectories(records, CharTokenizer(), max_seq_len=16)
    (micro,) = TrajectoryBatches(sequences, 0, 16, micro_batch_size=2).micro_batches([0, 1], 0, 1)
    # row 0: ids a b c d eos; labels at positions 1, 2, 3 are c, d, eos
    assert micro["loss_mask"][0, :4].tolist() == [0, 1, 1, 1]
    assert micro["labels"][0, 1:4].tolist() == [5, 6, 1]
    assert torch.allclose(micro["behaviour_logp"][0, 1:4], torch.tensor([-0.1, -0.2, -0.3]))
    assert torch.allclose(micro["rewards"][0, :5], torch.tensor([0.0, 0.1, 0.0, 1.2, 0.0]))
    assert micro["loss_mask"][1, :5].tolist() == [1, 1, 1, 1, 0] and micro["rewards"][1].abs().sum() == 0
    assert micro["normalizer"].item() == 2


def test_sampler_token_ids_are_used_as_the_response():
    record = trajectory(response="xyz", response_ids=[7, 8], behaviour_logp=[-1.0, -2.0], ref_logp=[-1.0, -1.0])
    (sequence,) = tokenize_trajectories([record], CharTokenizer(), max_seq_len=16)
    assert sequence["ids"] == [3, 4, 7, 8] and sequence["rewards"] == [0.0, 1.0]


@pytest.mark.parametrize("change,key", [({"ref_logp": [-1.0]}, "ref_logp"), ({"process_rewards": [0.0]}, "process_rewards"),
                                        ({"reward": "1"}, "reward"), ({"behaviour_logp": None}, "behaviour_logp")])
def test_bad_trajectory_records_name_the_key(change, key):
    with pytest.raises(DataError, match=f"record 0: .*'{key}'"):
        tokenize_trajectories([trajectory(**change)], CharTokenizer(), max_seq_len=16)


def test_trajectory_batches_feed_dqo_and_dro_and_slice_by_dp_rank():
    records = [trajectory(response="c" * (i + 1), reward=float(i % 2)) for i in range(4)]
    batches = TrajectoryBatches(tokenize_trajectories(records, CharTokenizer(), 16), 0, 16, micro_batch_size=1)
    micro = batches.micro_batches([3, 2, 1, 0], dp_rank=1, dp_size=2)
    assert len(micro) == 2 and micro[0]["loss_mask"].sum() == 3 and micro[0]["normalizer"].item() == 4
    for name in ("dqo", "dro"):
        plugin = losses.get(name)
        length = micro[0]["input_ids"].shape[1]
        outputs = {"logprobs": torch.full((1, length), -0.5, requires_grad=True), "values": torch.zeros(1, length)}
        loss, metrics = plugin.compute(plugin.parse_options({}), micro[0], outputs)
        assert torch.isfinite(loss) and metrics["sequences"].item() == 1


def test_pairs_stay_together_and_micro_batch_size_counts_pairs():
    records = [{"prompt": "ab", "chosen": "c" * (i + 1), "rejected": "d", "ref_chosen_logp": -1.0 * i,
                "ref_rejected_logp": -2.0 * i} for i in range(4)]
    batches = PairBatches(tokenize_pairs(records, CharTokenizer(), 16), 0, 16, micro_batch_size=1)
    assert len(batches) == 4 and batches.make_order(2, seed=0).steps_per_epoch == 2
    micro = batches.micro_batches([2, 0, 3, 1], dp_rank=0, dp_size=2)
    assert len(micro) == 2 and all(m["input_ids"].shape[0] == 2 for m in micro)
    assert micro[0]["ref_logp"].tolist() == [-2.0, -4.0] and micro[0]["chosen"].tolist() == [1.0, 0.0]
    assert micro[0]["loss_mask"].sum(dim=1).tolist() == [4, 2]  # "ccc" + eos, "d" + eos
    plugin = losses.get("dpo")
    loss, metrics = plugin.compute(plugin.parse_options({}), micro[0], torch.zeros(2, micro[0]["input_ids"].shape[1]))
    assert micro[0]["normalizer"].item() == 4 and metrics["pairs"].item() == 1 and torch.isfinite(loss)


def test_labelled_rows_know_their_global_position():
    records = [{"prompt": "ab", "response": "c" * (i + 1), "desirable": i % 2 == 0, "ref_logp": -float(i)} for i in range(4)]
    batches = LabelledBatches(tokenize_labelled(records, CharTokenizer(), 16), 0, 16, micro_batch_size=2)
    (micro,) = batches.micro_batches([3, 2, 1, 0], dp_rank=1, dp_size=2)
    assert micro["row"].tolist() == [2, 3] and micro["desirable"].tolist() == [0.0, 1.0]
    assert micro["ref_logp"].tolist() == [-1.0, 0.0] and micro["normalizer"].item() == 4
    plugin = losses.get("kto")
    loss, _ = plugin.compute(plugin.parse_options({"kl_group_size": 2}), micro, torch.zeros(2, micro["input_ids"].shape[1]))
    assert torch.isfinite(loss)


def test_labelled_records_need_a_boolean_label():
    with pytest.raises(DataError, match="'desirable' must be boolean"):
        tokenize_labelled([{"prompt": "a", "response": "b", "desirable": 1, "ref_logp": 0.0}], CharTokenizer(), 16)

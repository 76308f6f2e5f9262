"""Sequence packing of `trajectory` batches (DQO, DRO and the scorer's `tokens`): the per-token numbers
laid out like the packed `loss_mask`, the same dqo / dro losses and per-record token log-probs, in
record order, as unpacked rows; and of `labelled` batches (KTO): each micro-batch's responses packed,
its KL groups whole, the same kto loss."""
from __future__ import annotations

import torch

from stepwise import losses
from stepwise.train.prefix_packing import flat_rows
from stepwise.train.score import response_token_values
from stepwise.train.labelled_data import LabelledBatches
from stepwise.train.trajectory_data import TrajectoryBatches

# a position's "log-prob" and "value" as functions of (token, position); seeded, not the global RNG
TABLE = torch.randn(2, 97, generator=torch.Generator().manual_seed(0))


def outputs(batch: dict) -> dict[str, torch.Tensor]:
    """What a policy_value model gives a loss: the label's log-prob and the value at each position, each
    a function of the position's input and position id only, as a correctly masked packed model's are."""
    logprobs = TABLE[0][(batch["labels"] * 5 + batch["position_ids"]) % 97]
    values = TABLE[1][(batch["input_ids"] * 3 + batch["position_ids"]) % 97]
    return {"logprobs": flat_rows(logprobs, batch["loss_mask"]), "values": flat_rows(values, batch["loss_mask"])}


def trajectories(inputs: tuple[int, ...] = (12, 3, 4, 5, 8, 2)) -> list[dict]:
    """Trajectory k: a prompt of 3 tokens and a response making `inputs[k]` input tokens, random numbers."""
    generator = torch.Generator().manual_seed(0)
    out = []
    for k, n in enumerate(inputs):
        response = n - 2
        numbers = lambda: (torch.randn(response, generator=generator) * 0.3).tolist()  # noqa: E731
        out.append({"ids": [1 + k] * 3 + [10 + k] * response, "mask": [0] * 3 + [1] * response,
                    "behaviour_logp": numbers(), "ref_logp": numbers(), "rewards": numbers()})
    return out


def test_packed_trajectories_keep_the_dqo_and_dro_losses():
    data = trajectories()
    indices = [5, 0, 3, 1, 4, 2]
    plain = TrajectoryBatches(data, 0, 32, 2).micro_batches(indices, 0, 1)
    packed = TrajectoryBatches(data, 0, 32, 2, pack=True).micro_batches(indices, 0, 1)
    assert len(packed) < len(plain) and all("attention_mask" in b for b in packed)
    # each trajectory's numbers sit at its targets, in order
    assert sorted(round(float(b["rewards"][k][b["loss_mask"][k] > 0].sum()), 5) for b in packed for k in range(len(b["rewards"]))) \
        == sorted(round(sum(t["rewards"]), 5) for t in data)
    for name in ("dqo", "dro"):
        plugin = losses.get(name)
        options = plugin.parse_options({})
        total = lambda micro: sum(plugin.compute(options, b, outputs(b))[0] for b in micro)  # noqa: E731
        assert torch.allclose(total(plain), total(packed), rtol=1e-5, atol=0), name


def test_packed_token_scores_come_back_per_record_in_order():
    """The scorer's `tokens` kind: one micro-batch per chunk of micro_batch_size records, their rows
    stacked, each record's token log-probs in the chunk's order."""
    data = trajectories()
    for chunk in ([0, 1, 2, 3, 4, 5], [4, 1, 5]):
        plain = TrajectoryBatches(data, 0, 32, 6).micro_batches(chunk, 0, 1)
        packed = TrajectoryBatches(data, 0, 32, 6, pack=True).micro_batches(chunk, 0, 1)
        assert len(packed) == 1 and packed[0]["input_ids"].shape[0] < len(chunk)
        scores = [response_token_values(outputs(b)["logprobs"], b["loss_mask"]) for b in (plain[0], packed[0])]
        assert [len(s) for s in scores[1]] == [len(data[i]["rewards"]) for i in chunk]
        assert all(torch.allclose(torch.tensor(a), torch.tensor(b)) for a, b in zip(*scores))


def test_packed_labelled_micro_batches_keep_their_kl_groups_and_the_kto_loss():
    data = [{**t, "desirable": k % 3 != 0, "ref_logp": -2.0 - k} for k, t in enumerate(trajectories((12, 3, 4, 5, 8, 2, 6, 7)))]
    indices = [7, 0, 5, 1, 6, 2, 4, 3]
    plugin = losses.get("kto")
    options = plugin.parse_options({"kl_group_size": 2})
    total = lambda micro: sum(plugin.compute(options, b, outputs(b)["logprobs"])[0] for b in micro)  # noqa: E731
    plain = [m for r in range(2) for m in LabelledBatches(data, 0, 32, 4).micro_batches(indices, r, 2)]
    batches = LabelledBatches(data, 0, 32, 4, pack=True)
    packed = [m for r in range(2) for m in batches.micro_batches(indices, r, 2)]
    # inputs 7, 12, 2, 3 | 6, 4, 8, 5 in rows of 16: 7 + 2 + 3, 12 | 6 + 4 + 5, 8
    assert [tuple(b["input_ids"].shape) for b in packed] == [(2, 16), (2, 16)]
    assert [b["row"].tolist() for b in packed] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert all(torch.equal(b["ref_logp"], torch.tensor([data[indices[r]]["ref_logp"] for r in b["row"].tolist()]))
               for b in packed)
    assert torch.allclose(total(plain), total(packed), rtol=1e-6, atol=0)
    assert batches.tokens(indices) == LabelledBatches(data, 0, 32, 4).tokens(indices)

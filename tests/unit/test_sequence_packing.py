"""Sequence packing of the `sft` and `pair` builders (`train.pack_sequences`): samples of a global batch
first-fit in rows of the longest sample's padded length, up to micro_batch_size rows to a micro-batch,
a pair never split across rows, the same per-sample log-prob sums and losses as unpacked rows, and an
unpacked fallback for a pair too long for one row."""
from __future__ import annotations

import pytest
import torch

from stepwise import losses
from stepwise.train.pair_data import PairBatches
from stepwise.train.prefix_packing import flat_rows, pack_rows, read_positions
from stepwise.train.sft_data import SFTBatches

# a token's "log-prob" as a function of (label, position): multiples of 1/8 (sums of a few are exact in fp32 in
# any order, so only the losses' divisions and additions round), seeded (not the test order's global RNG state)
LOGPROB_OF = torch.randint(-64, 0, (97,), generator=torch.Generator().manual_seed(0)).float() / 8


def token_table(batch: dict) -> torch.Tensor:
    """Per-token "log-probs" as the engine hands them to a loss (stacked packed rows laid end to end)."""
    return flat_rows(LOGPROB_OF[(batch["labels"] * 5 + batch["position_ids"]) % 97], batch["loss_mask"])


def per_sample(batches: list[dict]) -> torch.Tensor:
    """Each sample's summed "log-prob", sorted (packing reorders samples)."""
    sums = torch.cat([torch.where(b["loss_mask"] > 0, token_table(b), 0.0).sum(dim=1) for b in batches])
    return sums.sort().values


def sequences(inputs: tuple[int, ...] = (12, 3, 4, 5, 8, 2)) -> list[dict]:
    """Sample k: a prompt of 3 tokens and a response making `inputs[k]` input tokens."""
    return [{"ids": [1 + k] * 3 + [10 + k] * (n - 2), "mask": [0] * 3 + [1] * (n - 2)} for k, n in enumerate(inputs)]


def test_a_group_lands_in_one_row():
    items = [([1, 2], [3, 4, 5]), ([6], [7, 8]), ([6], [9, 9, 9])]
    assert [[b.items for b in row] for row in pack_rows(items, budget=8)] == [[[0], [1]], [[2]]]
    # tied together, items 1 and 2 share a row (prompt once: 0 + 2 + 3 = 5 > 8 - 4): a new row for both
    assert [[b.items for b in row] for row in pack_rows(items, budget=8, group_sizes=[1, 2])] == [[[0]], [[1, 2]]]
    with pytest.raises(ValueError, match=r"items 1\.\.2 \(one group\): 5 input tokens exceed the row budget 4"):
        pack_rows(items, budget=4, group_sizes=[1, 2])
    # first fit: item 2 (2 inputs) goes back to row 0 (2 + 2 <= 7); the last row (6) has no room
    items = [([1, 2], [3]), ([4], [5, 6, 7, 8, 9, 10]), ([7], [8, 9])]
    assert [[b.items for b in row] for row in pack_rows(items, budget=7, first_fit=True)] == [[[0], [2]], [[1]]]
    assert [[b.items for b in row] for row in pack_rows(items, budget=7)] == [[[0]], [[1]], [[2]]]


def test_packed_sft_micro_batches_stack_rows_of_the_longest_sample_and_keep_sums_and_loss():
    data = sequences()
    indices = [0, 1, 2, 3, 4, 5]
    plain = SFTBatches(data, 0, 32, 2).micro_batches(indices, 0, 1)
    packed = SFTBatches(data, 0, 32, 2, pack=True).micro_batches(indices, 0, 1)
    # inputs 12, 3 | 4, 5, 2 | 8 first-fit in rows of 16 (12 rounded), two rows to a micro-batch
    assert [tuple(b["input_ids"].shape) for b in plain] == [(2, 16)] * 3
    assert [tuple(b["input_ids"].shape) for b in packed] == [(2, 16), (1, 16)]
    assert [tuple(b["loss_mask"].shape) for b in packed] == [(5, 32), (1, 16)]
    assert torch.equal(read_positions(packed[0]["loss_mask"], packed[0]["labels"]),
                       packed[0]["loss_mask"].reshape(5, 2, 16).any(dim=0))
    assert torch.allclose(per_sample(plain), per_sample(packed), rtol=1e-6, atol=0)
    plugin = losses.get("sft")
    options = plugin.parse_options({})
    loss = lambda batches: sum(plugin.compute(options, b, token_table(b))[0] for b in batches)  # noqa: E731
    assert torch.allclose(loss(plain), loss(packed), rtol=1e-6, atol=0)
    assert packed[0]["normalizer"].item() == plain[0]["normalizer"].item() == sum(n - 2 for n in (12, 3, 4, 5, 8, 2))
    assert SFTBatches(data, 0, 32, 2, pack=True).tokens(indices) == SFTBatches(data, 0, 32, 2).tokens(indices)
    # two DP ranks: contiguous runs of rows, every rank at the length of the global batch
    ranks = [SFTBatches(data, 0, 32, 2, pack=True).micro_batches(indices, r, 2) for r in range(2)]
    assert [[tuple(b["input_ids"].shape) for b in micro] for micro in ranks] == [[(1, 16)], [(2, 16)]]
    assert torch.allclose(per_sample(ranks[0] + ranks[1]), per_sample(plain), rtol=1e-6, atol=0)


def test_a_batch_no_two_samples_of_which_share_a_row_stays_unpacked():
    """Samples too long to pair up (inputs 12, 10, 11 in rows of 16): the unpacked micro-batches, no mask
    (causal attention; TE's fused kernel on a GPU)."""
    data = sequences((12, 10, 11))
    packed = SFTBatches(data, 0, 32, 2, pack=True)
    assert packed.packed_rows([0, 1, 2]) is None
    plain = SFTBatches(data, 0, 32, 2).micro_batches([0, 1, 2], 0, 1)
    for a, b in zip(packed.micro_batches([0, 1, 2], 0, 1), plain, strict=True):
        assert a.keys() == b.keys() and "attention_mask" not in a
        assert all(torch.equal(a[key], b[key]) for key in a)


def pairs() -> list[dict]:
    out = []
    for k, s in enumerate(sequences((4, 5, 6, 7, 8))):
        rejected = s["ids"][:3] + [30 + k] * (5 - k)
        out.append({"chosen": s, "rejected": {"ids": rejected, "mask": [0] * 3 + [1] * (5 - k)},
                    "ref_logp": (-1.0 - k, -2.0 - k)})
    return out


def test_packed_pairs_share_their_prompt_and_keep_the_dpo_loss():
    data = pairs()
    indices = [2, 0, 4, 1, 3]
    plain = PairBatches(data, 0, 16, 5).micro_batches(indices, 0, 1)
    batches = PairBatches(data, 0, 16, 2, pack=True)
    packed = batches.micro_batches(indices, 0, 1)
    # a pair alone: 2 shared + 9 inputs = 11 -> rows of 16, one pair each (two pairs take 22 > 16)
    assert [tuple(b["input_ids"].shape) for b in packed] == [(2, 16), (2, 16), (1, 16)]
    assert all(torch.equal(b["chosen"], torch.tensor([1.0, 0.0] * (b["loss_mask"].shape[0] // 2))) for b in packed)
    pairs_of = lambda micro: sorted(tuple(r) for b in micro for r in b["ref_logp"].reshape(-1, 2).tolist())  # noqa: E731
    assert pairs_of(packed) == pairs_of(plain)
    assert torch.allclose(per_sample(plain), per_sample(packed), rtol=1e-6, atol=0)
    assert batches.tokens(indices) == PairBatches(data, 0, 16, 5).tokens(indices) - 2 * len(indices)  # prompt[:-1] once
    plugin = losses.get("dpo")
    options = plugin.parse_options({})
    loss = lambda micro: sum(plugin.compute(options, b, token_table(b))[0] for b in micro)  # noqa: E731
    assert torch.allclose(loss(plain), loss(packed), rtol=1e-6, atol=0)


def test_a_pair_too_long_for_one_row_leaves_its_global_batch_unpacked():
    data = pairs()  # every pair: 2 shared + 7 input tokens
    data[0]["rejected"] = {"ids": [1] * 3 + [40] * 7, "mask": [0] * 3 + [1] * 7}
    batches = PairBatches(data, 0, 10, 5, pack=True)  # pair 0: 2 shared + 3 + 7 = 12 input tokens > 10
    micro = batches.micro_batches([0, 1], 0, 1)
    assert "attention_mask" not in micro[0] and micro[0]["input_ids"].shape[0] == 4
    assert "attention_mask" in batches.micro_batches([3, 4], 0, 1)[0]


@pytest.mark.parametrize("kind, section, record", [
    ("sft", "sft", {"prompt": "Q: 1+2\n", "response": "A: 3"}),
    ("pair", "dpo", {"prompt": "Q: 1+2\n", "chosen": "A: 3", "rejected": "A: 4", "ref_chosen_logp": -1.0,
                     "ref_rejected_logp": -2.0}),
    ("action", "policy", {"state_id": "s", "prompt_ids": [3, 4, 5], "action_ids": [6, 1], "advantage": 0.5,
                          "ref_logp": -1.0}),
    ("labelled", "kto", {"prompt": "Q: 1+2\n", "response": "A: 3", "desirable": True, "ref_logp": -1.0}),
    ("trajectory", "dqo", {"prompt": "Q: 1+2\n", "response": "A: 3", "reward": 1.0, "behaviour_logp": [-1.0] * 5,
                           "ref_logp": [-1.0] * 5}),
])
def test_the_workers_entry_point_packs_when_switched_on_here_and_not_when_off(kind, section, record):
    """What the pipeline calls (worker.build_batches with the recipe): packing follows the train section's
    switch (pack_prefixes and pack_sequences both on by default), under either layer spec (Transformer
    Engine's sends the masks to SDPA: stepwise.models.te_packed_attention)."""
    from stepwise.config.schema import RecipeConfig
    from stepwise.train.worker import build_batches

    config = RecipeConfig()
    train = getattr(config, section)
    tokenizer = _CharTokenizer()
    assert build_batches(kind, [record] * 4, tokenizer, config, train, "records").pack
    config.model.transformer_impl = "te"
    assert build_batches(kind, [record] * 4, tokenizer, config, train, "records").pack
    for key in ("pack_prefixes", "pack_sequences"):
        setattr(train, key, False)
    assert not build_batches(kind, [record] * 4, tokenizer, config, train, "records").pack


class _CharTokenizer:
    """One id per character (3 + code % 50), eos 1, pad 0: enough for the builders."""

    eos_token_id, pad_token_id = 1, 0

    def __call__(self, texts, add_special_tokens=False):
        if isinstance(texts, str):
            return {"input_ids": [3 + ord(c) % 50 for c in texts]}
        return {"input_ids": [[3 + ord(c) % 50 for c in text] for text in texts]}

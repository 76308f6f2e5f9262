"""The `sft` batch builder: `{"prompt", "response"}` records -> token ids with a response mask.

A sequence is prompt + response + eos; targets are the response tokens and the eos. The global
normaliser is the number of target tokens in the whole global batch.
"""
from __future__ import annotations

import torch

from stepwise.data.jsonl import DataError
from stepwise.train.batches import DataOrder, collate_sft, dp_slice, pad_length, split_micro_batches


def tokenize_sft(records: list[dict], tokenizer, max_seq_len: int, source: str = "data") -> list[dict]:
    """Token records `{"ids", "mask"}`; a sequence longer than `max_seq_len` + 1 is an error naming it."""
    eos = tokenizer.eos_token_id
    prompts = tokenizer([r["prompt"] for r in records], add_special_tokens=False)["input_ids"]
    responses = tokenizer([r["response"] for r in records], add_special_tokens=False)["input_ids"]
    sequences = []
    for index, (prompt, response) in enumerate(zip(prompts, responses)):
        ids = prompt + response + [eos]
        if len(ids) > max_seq_len + 1:
            raise DataError(f"{source}: record {index}: {len(ids)} tokens exceed model.max_seq_len={max_seq_len}")
        sequences.append({"ids": ids, "mask": [0] * len(prompt) + [1] * (len(response) + 1)})
    return sequences


class SFTBatches:
    """Builds this DP rank's micro-batches of a global batch of token records."""

    def __init__(self, sequences: list[dict], pad_id: int, max_seq_len: int, micro_batch_size: int):
        self.sequences = sequences
        self.pad_id = pad_id
        self.max_seq_len = max_seq_len
        self.micro_batch_size = micro_batch_size

    def __len__(self) -> int:
        return len(self.sequences)

    def make_order(self, global_batch_size: int, seed: int) -> DataOrder:
        return DataOrder(len(self.sequences), global_batch_size, seed)

    def tokens(self, indices: list[int]) -> int:
        return sum(len(self.sequences[i]["ids"]) - 1 for i in indices)

    def micro_batches(self, indices: list[int], dp_rank: int, dp_size: int) -> list[dict[str, torch.Tensor]]:
        chosen = [self.sequences[i] for i in indices]
        length = pad_length([len(s["ids"]) - 1 for s in chosen], self.max_seq_len)
        normalizer = float(sum(sum(s["mask"][1:]) for s in chosen))
        mine = [self.sequences[i] for i in dp_slice(indices, dp_rank, dp_size)]
        batch = collate_sft(mine, length, self.pad_id)
        batch["normalizer"] = torch.tensor(max(normalizer, 1.0))
        return split_micro_batches(batch, self.micro_batch_size)

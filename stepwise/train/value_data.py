"""The `values` batch builder: one sequence per solution, a critic target at the end of each state.

A record is `{"prompt", "steps": [step texts], "mc": [MC value of state t, t = 0..len(mc)-1]}`;
state t is the prompt plus the first t steps (each step followed by the separator). The sequence is
built by concatenating the token ids of the prompt and of each step, so a state's tokens are
exactly a prefix of the solution's tokens and its value is read at its last token.
"""
from __future__ import annotations

import torch

from stepwise.data.jsonl import DataError
from stepwise.train.batches import DataOrder, dp_slice, pad_length, split_micro_batches


def tokenize_states(records: list[dict], tokenizer, max_seq_len: int, separator: str = "\n",
                    source: str = "data") -> list[dict]:
    """Token records `{"ids", "positions", "targets"}`: positions[t] is the last token of state t."""
    out = []
    for index, record in enumerate(records):
        ids = tokenizer(record["prompt"], add_special_tokens=False)["input_ids"]
        ends = [len(ids) - 1]
        for step in record["steps"]:
            ids = ids + tokenizer(step + separator, add_special_tokens=False)["input_ids"]
            ends.append(len(ids) - 1)
        mc = [float(v) for v in record["mc"]]
        if len(mc) > len(ends):
            raise DataError(f"{source}: record {index}: {len(mc)} MC values for {len(ends)} states")
        if len(ids) > max_seq_len:
            raise DataError(f"{source}: record {index}: {len(ids)} tokens exceed model.max_seq_len={max_seq_len}")
        out.append({"ids": ids, "positions": ends[: len(mc)], "targets": mc})
    return out


def collate_values(sequences: list[dict], length: int, pad_id: int) -> dict[str, torch.Tensor]:
    batch = len(sequences)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    value_mask = torch.zeros((batch, length), dtype=torch.float32)
    value_target = torch.zeros((batch, length), dtype=torch.float32)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence["ids"])] = torch.tensor(sequence["ids"])
        value_mask[row, sequence["positions"]] = 1.0
        value_target[row, sequence["positions"]] = torch.tensor(sequence["targets"])
    position_ids = torch.arange(length).unsqueeze(0).expand(batch, -1).contiguous()
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": input_ids.clone(),
            "value_mask": value_mask, "value_target": value_target}


class ValueBatches:
    """This DP rank's micro-batches of a global batch of solution records (normaliser: states)."""

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
        return sum(len(self.sequences[i]["ids"]) for i in indices)

    def micro_batches(self, indices: list[int], dp_rank: int, dp_size: int) -> list[dict[str, torch.Tensor]]:
        chosen = [self.sequences[i] for i in indices]
        length = pad_length([len(s["ids"]) for s in chosen], self.max_seq_len)
        batch = collate_values([self.sequences[i] for i in dp_slice(indices, dp_rank, dp_size)], length, self.pad_id)
        batch["normalizer"] = torch.tensor(float(max(1, sum(len(s["positions"]) for s in chosen))))
        return split_micro_batches(batch, self.micro_batch_size)

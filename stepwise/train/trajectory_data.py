"""The `trajectory` batch builder for `dqo` and `dro`: sampled responses with token-level log-probs and rewards.

A record is

    {"prompt": str, "response": str, "response_ids": [int] (optional),
     "behaviour_logp": [float], "ref_logp": [float], "reward": float, "process_rewards": [float] (optional)}

The response's tokens are `response_ids` when present (the sampler's own tokens ending in eos, as
`tasks.steps.target_ids` gives them), else the tokenized `response` followed by eos. `behaviour_logp` (log μ, the
sampling distribution) and `ref_logp` (log π_ref) hold one number per response token, as do the
optional `process_rewards`; the outcome `reward` is added on the last response token.

A micro-batch is a right-padded next-token batch (`input_ids`, `labels`, `loss_mask`, `position_ids`)
plus [B, S] tensors `behaviour_logp`, `ref_logp`, `rewards` aligned with `labels`: position t holds
the numbers of token t+1, whose state s_h is tokens 0..t, so the model's value at position t is V(s_h).
The normaliser is the number of trajectories in the global batch.

With `train.pack_sequences` (the default) a global batch is packed as `sft_data`
describes; the per-token tensors are then laid out like the packed `loss_mask` ([trajectories, rows x
S], trajectory k's numbers at its own targets, in the order of the records), so a loss reading them
with log-probs and values as `prefix_packing.flat_rows` lays them out sees each trajectory as unpacked.
"""
from __future__ import annotations

import torch

from stepwise.data.jsonl import DataError, _check_field
from stepwise.data.records import token_ids
from stepwise.train.batches import collate_sft, split_micro_batches
from stepwise.train.prefix_packing import builder_micro_batches, segment_values
from stepwise.train.sft_data import SFTBatches

TOKEN_KEYS = ("behaviour_logp", "ref_logp", "rewards")


def _floats(where: str, record: dict, key: str, length: int) -> list[float]:
    _check_field(where, record, key, list)
    values = record[key]
    if len(values) != length:
        raise DataError(f"{where}: key '{key}' has {len(values)} entries for {length} response tokens")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise DataError(f"{where}: key '{key}' must be a list of numbers")
    return [float(v) for v in values]


def tokenize_trajectories(records: list[dict], tokenizer, max_seq_len: int, source: str = "data") -> list[dict]:
    """Token records `{"ids", "mask", "behaviour_logp", "ref_logp", "rewards"}` (the last three per response token)."""
    out = []
    for index, record in enumerate(records):
        where = f"{source}: record {index}"
        for key in ("prompt", "response"):
            _check_field(where, record, key, str)
        _check_field(where, record, "reward", float)
        prompt = tokenizer(record["prompt"], add_special_tokens=False)["input_ids"]
        if "response_ids" in record:
            response = token_ids(where, record, "response_ids")
        else:
            response = tokenizer(record["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if not response:
            raise DataError(f"{where}: the response has no tokens")
        ids = prompt + response
        if len(ids) > max_seq_len + 1:
            raise DataError(f"{where}: {len(ids)} tokens exceed model.max_seq_len={max_seq_len}")
        n = len(response)
        rewards = _floats(where, record, "process_rewards", n) if "process_rewards" in record else [0.0] * n
        rewards[-1] += float(record["reward"])
        out.append({"ids": ids, "mask": [0] * len(prompt) + [1] * n, "rewards": rewards,
                    "behaviour_logp": _floats(where, record, "behaviour_logp", n),
                    "ref_logp": _floats(where, record, "ref_logp", n)})
    return out


def collate_trajectories(sequences: list[dict], length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """`collate_sft` plus the per-token tensors, placed at the positions whose label is that token."""
    batch = collate_sft(sequences, length, pad_id)
    for key in TOKEN_KEYS:
        batch[key] = torch.zeros((len(sequences), length), dtype=torch.float32)
    for row, sequence in enumerate(sequences):
        n = len(sequence["rewards"])
        start = len(sequence["ids"]) - n - 1  # position of the prompt's last token
        for key in TOKEN_KEYS:
            batch[key][row, start : start + n] = torch.tensor(sequence[key], dtype=torch.float32)
    return batch


class TrajectoryBatches(SFTBatches):
    """This DP rank's micro-batches of a global batch of trajectories (normaliser: trajectories); packed
    rows when `pack` (`SFTBatches.packed_rows`)."""

    def micro_batches(self, indices: list[int], dp_rank: int, dp_size: int) -> list[dict[str, torch.Tensor]]:
        normalizer = torch.tensor(float(max(1, len(indices))))
        rows = self.packed_rows(indices) if self.pack else None
        if rows is not None:
            micro = builder_micro_batches(self, rows, dp_rank, dp_size)
            for batch in micro:
                records = [self.sequences[indices[k]] for k in batch.pop("items").tolist()]
                for key in TOKEN_KEYS:
                    batch[key] = segment_values(batch["loss_mask"], [record[key] for record in records])
                batch["normalizer"] = normalizer
            return micro
        length = self.length([self.sequences[i] for i in indices])
        batch = collate_trajectories(self.mine(indices, dp_rank, dp_size), length, self.pad_id)
        batch["normalizer"] = normalizer
        return split_micro_batches(batch, self.micro_batch_size)


def build_batches(records: list[dict], tokenizer, config, train, source: str = "data", *, where=None,
                  screen=None) -> TrajectoryBatches:
    """The worker's entry point for data kind `trajectory` (strict: every bad record is an error, `where` / `screen` unused)."""
    sequences = tokenize_trajectories(records, tokenizer, config.model.max_seq_len, source)
    return TrajectoryBatches(sequences, tokenizer.pad_token_id, config.model.max_seq_len, train.micro_batch_size,
                             train.pack_sequences)

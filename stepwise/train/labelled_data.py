"""The `labelled` batch builder for `kto`: single responses marked desirable or undesirable.

A record is

    {"prompt": str, "response": str, "desirable": bool, "ref_logp": float}

where `ref_logp` is log π_ref(response + eos | prompt), summed over the response tokens and the eos,
exactly the tokens this builder marks in `loss_mask`; an optional `response_ids` holds the response's
exact sampled ids (ending in eos), used instead of tokenizing it. Besides the SFT tensors a micro-batch carries
`desirable` [B], `ref_logp` [B] and `row` [B], each row's position in the global batch (the `kto`
loss groups rows by it for its reference point). The normaliser is the number of responses in the
global batch.
"""
from __future__ import annotations

import torch

from stepwise.data.jsonl import _check_field
from stepwise.train.batches import SequenceBatches, collate_sft, split_micro_batches
from stepwise.train.sft_data import tokenize_sft


def tokenize_labelled(records: list[dict], tokenizer, max_seq_len: int, source: str = "data") -> list[dict]:
    """Token records `{"ids", "mask", "desirable", "ref_logp"}`."""
    for index, record in enumerate(records):
        where = f"{source}: record {index}"
        for key, kind in (("prompt", str), ("response", str), ("desirable", bool), ("ref_logp", float)):
            _check_field(where, record, key, kind)
    sequences = tokenize_sft(records, tokenizer, max_seq_len, source)
    return [{**s, "desirable": bool(r["desirable"]), "ref_logp": float(r["ref_logp"])} for s, r in zip(sequences, records)]


class LabelledBatches(SequenceBatches):
    """This DP rank's micro-batches of a global batch of labelled responses (normaliser: responses)."""

    def micro_batches(self, indices: list[int], dp_rank: int, dp_size: int) -> list[dict[str, torch.Tensor]]:
        mine = self.mine(indices, dp_rank, dp_size)
        first_row = dp_rank * (len(indices) // dp_size)
        batch = collate_sft(mine, self.length([self.sequences[i] for i in indices]), self.pad_id)
        batch["desirable"] = torch.tensor([float(s["desirable"]) for s in mine])
        batch["ref_logp"] = torch.tensor([s["ref_logp"] for s in mine], dtype=torch.float32)
        batch["row"] = torch.arange(first_row, first_row + len(mine))
        batch["normalizer"] = torch.tensor(float(max(1, len(indices))))
        return split_micro_batches(batch, self.micro_batch_size)


def build_batches(records: list[dict], tokenizer, config, train, source: str = "data", *, where=None,
                  screen=None) -> LabelledBatches:
    """The worker's entry point for data kind `labelled` (strict: every bad record is an error, `where` / `screen` unused)."""
    sequences = tokenize_labelled(records, tokenizer, config.model.max_seq_len, source)
    return LabelledBatches(sequences, tokenizer.pad_token_id, config.model.max_seq_len, train.micro_batch_size)

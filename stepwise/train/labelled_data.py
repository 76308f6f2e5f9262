"""The `labelled` batch builder for `kto`: single responses marked desirable or undesirable.

A record is

    {"prompt": str, "response": str, "desirable": bool, "ref_logp": float}

where `ref_logp` is log π_ref(response + eos | prompt), summed over the response tokens and the eos,
exactly the tokens this builder marks in `loss_mask`; an optional `response_ids` holds the response's
exact sampled ids (ending in eos), used instead of tokenizing it. Besides the SFT tensors a micro-batch carries
`desirable` [B], `ref_logp` [B] and `row` [B], each row's position in the global batch (the `kto`
loss groups rows by it for its reference point). The normaliser is the number of responses in the
global batch.

With `train.pack_sequences` (the default) each unpacked micro-batch's responses,
and so each of its KL groups whole, are packed into rows of the global batch's padded length
(`stepwise.train.prefix_packing`, first-fit) stacked as one micro-batch: as many micro-batches as
unpacked, fewer rows; `loss_mask` has one row per response ([responses, rows x S]) and `desirable`,
`ref_logp`, `row` follow it.
"""
from __future__ import annotations

import torch

from stepwise.data.jsonl import _check_field
from stepwise.train.batches import collate_sft, split_micro_batches
from stepwise.train.prefix_packing import collate_rows, item_of, pack_rows, row_length
from stepwise.train.sft_data import SFTBatches, tokenize_sft


def tokenize_labelled(records: list[dict], tokenizer, max_seq_len: int, source: str = "data") -> list[dict]:
    """Token records `{"ids", "mask", "desirable", "ref_logp"}`."""
    for index, record in enumerate(records):
        where = f"{source}: record {index}"
        for key, kind in (("prompt", str), ("response", str), ("desirable", bool), ("ref_logp", float)):
            _check_field(where, record, key, kind)
    sequences = tokenize_sft(records, tokenizer, max_seq_len, source)
    return [{**s, "desirable": bool(r["desirable"]), "ref_logp": float(r["ref_logp"])} for s, r in zip(sequences, records)]


class LabelledBatches(SFTBatches):
    """This DP rank's micro-batches of a global batch of labelled responses (normaliser: responses);
    each micro-batch's responses packed in rows when `pack`."""

    def packed_chunks(self, indices: list[int], positions: range) -> list[tuple[list[int], list]]:
        """(global-batch positions, packed rows) of each micro-batch of `positions` of the global batch."""
        budget = self.length([self.sequences[i] for i in indices])
        chunks = [list(positions[start : start + self.micro_batch_size])
                  for start in range(0, len(positions), self.micro_batch_size)]
        return [(chunk, pack_rows([item_of(self.sequences[indices[p]]) for p in chunk], budget, first_fit=True))
                for chunk in chunks]

    def tokens(self, indices: list[int]) -> int:
        if not self.pack:
            return super().tokens(indices)
        return sum(row_length(row) for _, rows in self.packed_chunks(indices, range(len(indices))) for row in rows)

    def micro_batches(self, indices: list[int], dp_rank: int, dp_size: int) -> list[dict[str, torch.Tensor]]:
        per_rank = len(indices) // dp_size
        first_row = dp_rank * per_rank
        normalizer = torch.tensor(float(max(1, len(indices))))
        if not self.pack:
            mine = self.mine(indices, dp_rank, dp_size)
            batch = collate_sft(mine, self.length([self.sequences[i] for i in indices]), self.pad_id)
            batch = labelled(batch, mine, list(range(first_row, first_row + len(mine))), normalizer)
            return split_micro_batches(batch, self.micro_batch_size)
        micro = []
        length = self.length([self.sequences[i] for i in indices])
        for chunk, rows in self.packed_chunks(indices, range(first_row, first_row + per_rank)):
            batch = collate_rows(rows, length, self.pad_id)
            positions = [chunk[k] for k in batch.pop("items").tolist()]
            micro.append(labelled(batch, [self.sequences[indices[p]] for p in positions], positions, normalizer))
        return micro


def labelled(batch: dict, sequences: list[dict], rows: list[int], normalizer: torch.Tensor) -> dict:
    """`batch` with `desirable`, `ref_logp` and `row` of its responses `sequences` at global-batch positions `rows`."""
    batch["desirable"] = torch.tensor([float(s["desirable"]) for s in sequences])
    batch["ref_logp"] = torch.tensor([s["ref_logp"] for s in sequences], dtype=torch.float32)
    batch["row"] = torch.tensor(rows, dtype=torch.long)
    batch["normalizer"] = normalizer
    return batch


def build_batches(records: list[dict], tokenizer, config, train, source: str = "data", *, where=None,
                  screen=None) -> LabelledBatches:
    """The worker's entry point for data kind `labelled` (strict: every bad record is an error, `where` / `screen` unused)."""
    sequences = tokenize_labelled(records, tokenizer, config.model.max_seq_len, source)
    return LabelledBatches(sequences, tokenizer.pad_token_id, config.model.max_seq_len, train.micro_batch_size,
                           train.pack_sequences)

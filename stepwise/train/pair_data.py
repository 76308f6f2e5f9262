"""The `pair` batch builder for `dpo`: (chosen, rejected) responses to one prompt, kept side by side.

A record is

    {"prompt": str, "chosen": str, "rejected": str, "ref_chosen_logp": float, "ref_rejected_logp": float}

where each reference log-prob is log π_ref(response + eos | prompt), summed over the response tokens
and the eos, exactly the tokens this builder marks in `loss_mask`. Optional `chosen_ids` and
`rejected_ids` hold the responses' exact sampled ids (ending in eos), used instead of tokenizing. One sample of the data order is
one pair, so `global_batch_size` and `micro_batch_size` count *pairs*: a micro-batch of m pairs has
2m rows, pair i at rows 2i (chosen) and 2i+1 (rejected), so the two halves of a pair are always in
the same forward pass. The normaliser is the number of pairs in the global batch.

With `train.pack_sequences` a global batch is packed as `sft_data` describes, each pair a group that
never straddles two rows (chosen then rejected, sharing the prompt once; rows as long as the longest
pair packed alone): a micro-batch of up to `micro_batch_size` rows has a `loss_mask` [2 x pairs,
rows x S] with a pair's rows at 2i and 2i+1 as above, `ref_logp` and `chosen` alike. A global batch with a pair too long for one row is collated unpacked (as exact).
"""
from __future__ import annotations

import torch

from stepwise.data.jsonl import _check_field
from stepwise.train.batches import LENGTH_MULTIPLE, DataOrder, collate_sft, dp_slice, pad_length, split_micro_batches
from stepwise.train.prefix_packing import RowPacker, builder_micro_batches, item_of, row_length
from stepwise.train.sft_data import tokenize_sft

SIDES = ("chosen", "rejected")


def tokenize_pairs(records: list[dict], tokenizer, max_seq_len: int, source: str = "data") -> list[dict]:
    """Pair records `{"chosen": {"ids", "mask"}, "rejected": {...}, "ref_logp": (chosen, rejected)}`."""
    for index, record in enumerate(records):
        where = f"{source}: record {index}"
        for key in ("prompt", "chosen", "rejected"):
            _check_field(where, record, key, str)
        for key in ("ref_chosen_logp", "ref_rejected_logp"):
            _check_field(where, record, key, float)
    rows = [{"prompt": r["prompt"], "response": r[side],
             **({"response_ids": r[f"{side}_ids"]} if f"{side}_ids" in r else {})}
            for r in records for side in ("chosen", "rejected")]
    sequences = tokenize_sft(rows, tokenizer, max_seq_len, source)
    return [{"chosen": sequences[2 * i], "rejected": sequences[2 * i + 1],
             "ref_logp": (float(r["ref_chosen_logp"]), float(r["ref_rejected_logp"]))} for i, r in enumerate(records)]


class PairBatches:
    """This DP rank's micro-batches of a global batch of pairs (normaliser: pairs)."""

    length_multiple = LENGTH_MULTIPLE  # as SequenceBatches.length_multiple

    def __init__(self, pairs: list[dict], pad_id: int, max_seq_len: int, micro_batch_size: int, pack: bool = False):
        self.pairs = pairs
        self.pad_id = pad_id
        self.max_seq_len = max_seq_len
        self.micro_batch_size = micro_batch_size  # in pairs
        self.pack = pack
        self._packer = RowPacker(max_seq_len, fit_longest=True)

    def __len__(self) -> int:
        return len(self.pairs)

    def make_order(self, global_batch_size: int, seed: int) -> DataOrder:
        return DataOrder(len(self.pairs), global_batch_size, seed)

    def packed_rows(self, indices: list[int]) -> list | None:
        """The packed rows of a global batch of pairs (None: a pair does not fit one row)."""
        def items():
            return [item_of(self.pairs[i][side]) for i in indices for side in SIDES], [2] * len(indices)

        return self._packer.rows(tuple(indices), items, self.length_multiple)

    def tokens(self, indices: list[int]) -> int:
        rows = self.packed_rows(indices) if self.pack else None
        if rows is not None:
            return sum(row_length(row) for row in rows)
        return sum(len(self.pairs[i][side]["ids"]) - 1 for i in indices for side in SIDES)

    def micro_batches(self, indices: list[int], dp_rank: int, dp_size: int) -> list[dict[str, torch.Tensor]]:
        normalizer = torch.tensor(float(max(1, len(indices))))
        rows = self.packed_rows(indices) if self.pack else None
        if rows is not None:
            micro = builder_micro_batches(self, rows, dp_rank, dp_size)
            for batch in micro:
                items = batch.pop("items").tolist()  # 2i + side of pair indices[i]
                batch["ref_logp"] = torch.tensor([self.pairs[indices[k // 2]]["ref_logp"][k % 2] for k in items],
                                                 dtype=torch.float32)
                batch["chosen"] = torch.tensor([float(k % 2 == 0) for k in items])
                batch["normalizer"] = normalizer
            return micro
        length = pad_length([len(self.pairs[i][side]["ids"]) - 1 for i in indices for side in SIDES],
                            self.max_seq_len, self.length_multiple)
        mine = [self.pairs[i] for i in dp_slice(indices, dp_rank, dp_size)]
        batch = collate_sft([p[side] for p in mine for side in SIDES], length, self.pad_id)
        batch["ref_logp"] = torch.tensor([v for p in mine for v in p["ref_logp"]], dtype=torch.float32)
        batch["chosen"] = torch.tensor([1.0, 0.0] * len(mine))
        batch["normalizer"] = normalizer
        return split_micro_batches(batch, 2 * self.micro_batch_size)


def build_batches(records: list[dict], tokenizer, config, train, source: str = "data", *, where=None,
                  screen=None) -> PairBatches:
    """The worker's entry point for data kind `pair` (strict: every bad record is an error, `where` / `screen` unused)."""
    pairs = tokenize_pairs(records, tokenizer, config.model.max_seq_len, source)
    return PairBatches(pairs, tokenizer.pad_token_id, config.model.max_seq_len, train.micro_batch_size,
                       train.pack_sequences)

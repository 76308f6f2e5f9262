"""The `sft` batch builder: `{"prompt", "response"}` records -> token ids with a response mask.

A sequence is prompt + response + eos; targets are the response tokens and the eos. A record in token
form carries `response_ids` instead (the exact sampled ids, ending in eos: `tasks.steps.target_ids`),
used as they are. The global normaliser is the number of target tokens in the whole global batch.

With `train.pack_sequences` (the default) a global batch is packed
(`stepwise.train.prefix_packing`): rows as long as the batch's longest sample padded (at most
`model.max_seq_len`) each hold several samples, filled first-fit, each sample attending to itself
only, at its own positions (samples of one prompt in a row share it, as exact); a micro-batch stacks
up to `micro_batch_size` rows, with a `loss_mask` of one row per sample over its rows laid end to end
([samples, rows x S], against the log-probs as `prefix_packing.flat_rows` lays them out); rows are
dealt to the DP ranks in contiguous runs.
"""
from __future__ import annotations

import torch

from stepwise.data.records import RecordScreen, token_form, token_ids
from stepwise.train.batches import SequenceBatches, collate_sft, split_micro_batches, too_long
from stepwise.train.prefix_packing import RowPacker, builder_micro_batches, item_of, row_length


def tokenize_sft(records: list[dict], tokenizer, max_seq_len: int, source: str = "data", *,
                 where: list[str] | None = None, screen: RecordScreen | None = None) -> list[dict]:
    """Token records `{"ids", "mask"}`; a sequence longer than `max_seq_len` + 1 is an error naming it
    (`where[i]`, e.g. `path:line`, else `source: record i`), or skipped and counted by a lenient `screen`."""
    eos = tokenizer.eos_token_id
    labels = where or [f"{source}: record {index}" for index in range(len(records))]
    prompts = tokenizer([r["prompt"] for r in records], add_special_tokens=False)["input_ids"] if records else []
    as_text = [index for index, r in enumerate(records) if not token_form(labels[index], r, "sft")]
    encoded = tokenizer([records[i]["response"] for i in as_text], add_special_tokens=False)["input_ids"] if as_text else []
    responses = {i: ids + [eos] for i, ids in zip(as_text, encoded)}
    sequences = []
    for index, prompt in enumerate(prompts):
        response = responses[index] if index in responses else token_ids(labels[index], records[index], "response_ids")
        ids = prompt + response
        if len(ids) > max_seq_len + 1:
            too_long(index, len(ids), max_seq_len, source, where, screen)
            continue
        sequences.append({"ids": ids, "mask": [0] * len(prompt) + [1] * len(response)})
    return sequences


class SFTBatches(SequenceBatches):
    """Builds this DP rank's micro-batches of a global batch of token records; packed rows when `pack`."""

    def __init__(self, sequences: list[dict], pad_id: int, max_seq_len: int, micro_batch_size: int,
                 pack: bool = False):
        super().__init__(sequences, pad_id, max_seq_len, micro_batch_size)
        self.pack = pack
        self._packer = RowPacker(max_seq_len, fit_longest=True)

    def packed_rows(self, indices: list[int]) -> list | None:
        """The packed rows of a global batch; None (collate it unpacked) when a sample does not fit, or
        when every row would hold one sample: the unpacked rows then, without a mask (causal attention,
        TE's fused kernel on a GPU)."""
        rows = self._packer.rows(tuple(indices), lambda: ([item_of(self.sequences[i]) for i in indices], None),
                                 self.length_multiple)
        return rows if rows is not None and len(rows) < len(indices) else None

    def tokens(self, indices: list[int]) -> int:
        rows = self.packed_rows(indices) if self.pack else None
        return super().tokens(indices) if rows is None else sum(row_length(row) for row in rows)

    def micro_batches(self, indices: list[int], dp_rank: int, dp_size: int) -> list[dict[str, torch.Tensor]]:
        chosen = [self.sequences[i] for i in indices]
        normalizer = torch.tensor(max(float(sum(sum(s["mask"][1:]) for s in chosen)), 1.0))
        rows = self.packed_rows(indices) if self.pack else None
        if rows is not None:
            micro = builder_micro_batches(self, rows, dp_rank, dp_size)
            for batch in micro:
                batch.pop("items")
                batch["normalizer"] = normalizer
            return micro
        batch = collate_sft(self.mine(indices, dp_rank, dp_size), self.length(chosen), self.pad_id)
        batch["normalizer"] = normalizer
        return split_micro_batches(batch, self.micro_batch_size)


def build_batches(records: list[dict], tokenizer, config, train, source: str = "data", *, where=None,
                  screen=None) -> SFTBatches:
    """The worker's entry point for data kind `sft`."""
    sequences = tokenize_sft(records, tokenizer, config.model.max_seq_len, source, where=where, screen=screen)
    return SFTBatches(sequences, tokenizer.pad_token_id, config.model.max_seq_len, train.micro_batch_size,
                      train.pack_sequences)

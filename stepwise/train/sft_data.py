"""The `sft` batch builder: `{"prompt", "response"}` records -> token ids with a response mask.

A sequence is prompt + response + eos; targets are the response tokens and the eos. A record in token
form carries `response_ids` instead (the exact sampled ids, ending in eos: `tasks.steps.target_ids`),
used as they are. The global normaliser is the number of target tokens in the whole global batch.
"""
from __future__ import annotations

import torch

from stepwise.data.records import RecordScreen, token_form, token_ids
from stepwise.train.batches import SequenceBatches, collate_sft, split_micro_batches, too_long


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
    """Builds this DP rank's micro-batches of a global batch of token records."""

    def micro_batches(self, indices: list[int], dp_rank: int, dp_size: int) -> list[dict[str, torch.Tensor]]:
        chosen = [self.sequences[i] for i in indices]
        normalizer = float(sum(sum(s["mask"][1:]) for s in chosen))
        batch = collate_sft(self.mine(indices, dp_rank, dp_size), self.length(chosen), self.pad_id)
        batch["normalizer"] = torch.tensor(max(normalizer, 1.0))
        return split_micro_batches(batch, self.micro_batch_size)


def build_batches(records: list[dict], tokenizer, config, train, source: str = "data", *, where=None,
                  screen=None) -> SFTBatches:
    """The worker's entry point for data kind `sft`."""
    sequences = tokenize_sft(records, tokenizer, config.model.max_seq_len, source, where=where, screen=screen)
    return SFTBatches(sequences, tokenizer.pad_token_id, config.model.max_seq_len, train.micro_batch_size)

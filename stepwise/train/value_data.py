"""The `values` batch builder: one sequence per solution, a critic target at the end of each state.

A record is `{"ids": [token ids of the prompt and the sampled response], "ends": [exclusive end of
state t in ids], "mc": [MC value of state t]}` (the token form the pipeline writes: states are prefixes
of the exact sampled ids, so a state's value is read at token ends[t] - 1 whether it is scored here, as
a state of its solution, or as the next state of the step before it). Hand-written data may use the
text form `{"prompt", "steps": [step texts], "mc"}`: state t is the prompt plus the first t steps, each
step followed by the separator, tokenized piece by piece.

The branched form `{"ids": [a prefix's ids], "branches": [[ids of branch k], ...], "mc": [one per
branch]}` holds sequences that share a prefix (the advantage stage's next states of one state: the
state's ids, then each action's): the value of prefix + branch k is read at its last token, the
prefix computed once per row (`stepwise.train.branch_packing`). A file holds one form or the other.
"""
from __future__ import annotations

import torch

from stepwise.data.jsonl import DataError, _check_field
from stepwise.data.records import RecordScreen, token_form, token_ids
from stepwise.train.batches import SequenceBatches, pad_length, split_micro_batches, too_long
from stepwise.train.branch_packing import collate_branch_row, pack_branches, row_length
from stepwise.train.prefix_packing import stacked_rank_rows
from stepwise.train.value_packing import collate_solution_rows, pack_solutions


def _text_states(record: dict, tokenizer, separator: str) -> tuple[list[int], list[int]]:
    """(ids, state ends) of a text-form record."""
    ids = tokenizer(record["prompt"], add_special_tokens=False)["input_ids"]
    ends = [len(ids)]
    for step in record["steps"]:
        ids = ids + tokenizer(step + separator, add_special_tokens=False)["input_ids"]
        ends.append(len(ids))
    return ids, ends


def _token_states(where: str, record: dict) -> tuple[list[int], list[int]]:
    """(ids, state ends) of a token-form record, the ends checked: increasing, within 1..len(ids)."""
    ids = token_ids(where, record, "ids")
    _check_field(where, record, "ends", list)
    ends = record["ends"]
    if not all(isinstance(e, int) and not isinstance(e, bool) for e in ends) or \
            any(not 0 < e <= len(ids) for e in ends) or ends != sorted(set(ends)):
        raise DataError(f"{where}: key 'ends' must be increasing token positions in 1..{len(ids)}, got {ends!r:.60}")
    return ids, ends


def _branches(where: str, record: dict) -> tuple[list[int], list[list[int]]]:
    """(prefix, branches) of a branched record, checked: token ids, every branch non-empty, one MC value each."""
    _check_field(where, record, "ids", list)
    prefix = token_ids(where, record, "ids") if record["ids"] else []
    _check_field(where, record, "branches", list)
    branches = [token_ids(f"{where}: branch {k}", {"ids": branch}, "ids") for k, branch in enumerate(record["branches"])]
    if len(record["mc"]) != len(branches):
        raise DataError(f"{where}: {len(record['mc'])} MC values for {len(branches)} branches (key 'mc')")
    return prefix, branches


def _branched_sequence(label: str, record: dict, index: int, max_seq_len: int, source: str, where, screen):
    """The token record `{"ids", "branches", "targets"}` of a branched record, or None when rejected."""
    try:
        prefix, branches = _branches(label, record)
    except DataError as error:
        if screen is None:
            raise
        screen.reject_error(error)
        return None
    longest = len(prefix) + max((len(branch) for branch in branches), default=0)
    if longest > max_seq_len:
        too_long(index, longest, max_seq_len, source, where, screen)
        return None
    return {"ids": prefix, "branches": branches, "targets": [float(v) for v in record["mc"]]}


def tokenize_states(records: list[dict], tokenizer, max_seq_len: int, separator: str = "\n",
                    source: str = "data", *, where: list[str] | None = None,
                    screen: RecordScreen | None = None) -> list[dict]:
    """Token records `{"ids", "positions", "targets"}`: positions[t] is the last token of state t; of a
    branched record `{"ids", "branches", "targets"}`. Over-long records: see `batches.too_long`."""
    out = []
    for index, record in enumerate(records):
        label = where[index] if where else f"{source}: record {index}"
        if "branches" in record:
            sequence = _branched_sequence(label, record, index, max_seq_len, source, where, screen)
            if sequence is not None:
                out.append(sequence)
            continue
        try:
            ids, ends = (_token_states(label, record) if token_form(label, record, "values")
                         else _text_states(record, tokenizer, separator))
        except DataError as error:
            if screen is None:
                raise
            screen.reject_error(error)
            continue
        mc = [float(v) for v in record["mc"]]
        if len(mc) > len(ends):
            if screen is None:
                raise DataError(f"{label}: {len(mc)} MC values for {len(ends)} states")
            screen.reject(label, f"{len(mc)} MC values for {len(ends)} states")
            continue
        if len(ids) > max_seq_len:
            too_long(index, len(ids), max_seq_len, source, where, screen)
            continue
        out.append({"ids": ids, "positions": [end - 1 for end in ends[: len(mc)]], "targets": mc})
    return out


def state_record(ids: list[int]) -> dict:
    """A solution-form record of one state (token ids), to be scored at its last token."""
    return {"ids": ids, "ends": [len(ids)], "mc": [0.0]}


def branched_record(sequences: list[list[int]]) -> dict:
    """A branched record of `sequences` (token ids, each non-empty), to be scored at their last tokens:
    their longest common prefix (leaving each branch a token) as `ids`, the rest of each as a branch."""
    shared = min(len(sequence) for sequence in sequences) - 1
    for k, token in enumerate(sequences[0][:shared]):
        if any(sequence[k] != token for sequence in sequences):
            shared = k
            break
    return {"ids": sequences[0][:shared], "branches": [sequence[shared:] for sequence in sequences],
            "mc": [0.0] * len(sequences)}


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


class ValueBatches(SequenceBatches):
    """This DP rank's micro-batches of a global batch of solution records (normaliser: states); with
    `pack`, several solutions to a row (`stepwise.train.value_packing`), up to `micro_batch_size` rows
    to a micro-batch. Of branched records: packed rows of `max_seq_len` tokens, one per micro-batch.
    Packed rows of a global batch are dealt to the DP ranks in contiguous runs (an empty rank gets a
    row with no values), all padded to one length as pipeline schedules need."""

    label_shift = 0  # values are read at token positions, not next-token labels

    def __init__(self, sequences: list[dict], pad_id: int, max_seq_len: int, micro_batch_size: int,
                 pack: bool = False):
        super().__init__(sequences, pad_id, max_seq_len, micro_batch_size)
        forms = {"branches" in s for s in sequences}
        if len(forms) > 1:
            raise DataError("values records mix the branched form (key 'branches') with solutions (key 'ends')")
        self.branched = forms == {True}
        self.pack = pack and not self.branched  # branched records are always packed, their own way

    def _solution_rows(self, chosen: list[dict]) -> tuple[list[list[dict]], int] | None:
        """(rows, padded length) of a packed global batch; None unpacked, or where packing would leave each
        row one solution (the unpacked form is then the same rows without a mask: causal attention)."""
        if not self.pack:
            return None
        length = self.length(chosen)
        rows = pack_solutions(chosen, length)
        return (rows, length) if len(rows) < len(chosen) else None

    def tokens(self, indices: list[int]) -> int:
        if self.branched:
            return sum(row_length(row) for row in pack_branches([self.sequences[i] for i in indices], self.max_seq_len))
        return super().tokens(indices)

    def micro_batch_count(self, indices: list[int]) -> int:
        """How many micro-batches `micro_batches(indices, 0, 1)` gives, without building them."""
        if self.branched:
            return len(pack_branches([self.sequences[i] for i in indices], self.max_seq_len))
        packed = self._solution_rows([self.sequences[i] for i in indices])
        return -(-len(packed[0] if packed else indices) // self.micro_batch_size)

    def micro_batches(self, indices: list[int], dp_rank: int, dp_size: int) -> list[dict[str, torch.Tensor]]:
        chosen = [self.sequences[i] for i in indices]
        normalizer = torch.tensor(float(max(1, sum(len(s["targets"]) for s in chosen))))
        if self.branched:
            rows = pack_branches(chosen, self.max_seq_len)
            length = pad_length([max(1, row_length(row)) for row in rows] or [1], self.max_seq_len, self.length_multiple)
            return stacked_rank_rows(rows, dp_rank, dp_size, 1, lambda chunk: {
                **collate_branch_row(chunk[0], length, self.pad_id), "normalizer": normalizer})
        packed = self._solution_rows(chosen)
        if packed:
            rows, length = packed
            return stacked_rank_rows(rows, dp_rank, dp_size, self.micro_batch_size, lambda chunk: {
                **collate_solution_rows(chunk, length, self.pad_id), "normalizer": normalizer})
        batch = collate_values(self.mine(indices, dp_rank, dp_size), self.length(chosen), self.pad_id)
        batch["normalizer"] = normalizer
        return split_micro_batches(batch, self.micro_batch_size)


def build_batches(records: list[dict], tokenizer, config, train, source: str = "data", *, where=None,
                  screen=None) -> ValueBatches:
    """The worker's entry point for data kind `values`."""
    sequences = tokenize_states(records, tokenizer, config.model.max_seq_len, config.skywork_dapo.separator,
                                source=source, where=where, screen=screen)
    return ValueBatches(sequences, tokenizer.pad_token_id, config.model.max_seq_len, train.micro_batch_size,
                        train.pack_sequences)

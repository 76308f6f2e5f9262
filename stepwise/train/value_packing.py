"""Sequence packing of the `values` builder's solution records: several whole solutions to a row, each
attending to itself only, positions restarting at 0, each state read at the token it is read at alone.

Solutions fill rows in their order, and one that does not fit opens a new row: the scorer reads a
packed batch's values back in record order. A row is as long as the batch's longest solution padded
(the unpacked batch's row length, never longer), and a micro-batch holds up to `micro_batch_size`
rows. Each solution is a block of its own (`prefix_packing.blocked_mask`: causal, never another
block; padding a block of its own too), so its values are the ones it gets in its own unpadded row.
What it saves is the unpacked batch's padding: every solution padded to the longest.
"""
from __future__ import annotations

import torch

from stepwise.train.prefix_packing import blocked_mask


def pack_solutions(sequences: list[dict], budget: int) -> list[list[dict]]:
    """Rows of `sequences` (`{"ids", "positions", "targets"}`) in order, each row at most `budget` tokens."""
    rows: list[list[dict]] = []
    used = budget + 1  # forces the first row
    for index, sequence in enumerate(sequences):
        size = len(sequence["ids"])
        if size > budget:
            raise ValueError(f"solution {index} of {size} tokens exceeds the row budget {budget}")
        if used + size > budget:
            rows.append([])
            used = 0
        rows[-1].append(sequence)
        used += size
    return rows


def collate_solution_rows(rows: list[list[dict]], length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Packed rows as one micro-batch [len(rows), length]: input_ids, labels, position_ids, value_mask and
    value_target (each state's last token, as `value_data.collate_values` marks them), attention_mask
    [len(rows), 1, length, length] (True: may not attend)."""
    shape = (len(rows), length)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    block_of = torch.zeros(shape, dtype=torch.long)
    value_mask = torch.zeros(shape, dtype=torch.float32)
    value_target = torch.zeros(shape, dtype=torch.float32)
    for r, row in enumerate(rows):
        start = 0
        for block, sequence in enumerate(row):
            size = len(sequence["ids"])
            span = slice(start, start + size)
            input_ids[r, span] = torch.tensor(sequence["ids"])
            position_ids[r, span] = torch.arange(size)
            block_of[r, span] = block
            reads = [start + position for position in sequence["positions"]]
            value_mask[r, reads] = 1.0
            value_target[r, reads] = torch.tensor(sequence["targets"], dtype=torch.float32)
            start += size
        if start > length:
            raise ValueError(f"a packed row of {start} tokens does not fit the padded length {length}")
        position_ids[r, start:] = torch.arange(length - start)
        block_of[r, start:] = len(row)
    return {"input_ids": input_ids, "labels": input_ids.clone(), "position_ids": position_ids,
            "value_mask": value_mask, "value_target": value_target,
            "attention_mask": blocked_mask(block_of, torch.zeros_like(block_of))}

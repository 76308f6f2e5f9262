"""Shared-prefix packing: a state's prefix once, then each of its actions, in rows of a token budget.

An item is (prefix ids, action ids), read as the next-token row prefix + action would be (inputs
ids[:-1], targets ids[1:], loss on the action's tokens). A packed block holds the prefix's first
p-1 tokens once (shared, no targets) and, per action, a segment whose inputs are the prefix's last
token followed by the action but its last token, with the action as targets: the token that predicts
an action's first token is the segment's own copy of the prefix's last token. Inside a row each
segment sees its block's shared tokens and itself (causally), never another segment or block, and
its position ids continue from the shared part, so every target sees exactly the context and the
positions it has in its own unpadded row. Blocks fill rows of at most `budget` input tokens in the
items' order (an item of a new prefix opens a new block; one that does not fit opens a new row).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Block:
    shared: list[int]  # the prefix's first p-1 tokens
    segments: list[tuple[list[int], list[int]]] = field(default_factory=list)  # (inputs, targets)
    items: list[int] = field(default_factory=list)  # the caller's item index of each segment

    @property
    def length(self) -> int:
        return len(self.shared) + sum(len(inputs) for inputs, _ in self.segments)


def segment_of(prefix: list[int], action: list[int]) -> tuple[list[int], list[int], list[int]]:
    """(shared, segment inputs, segment targets) of one (prefix, action) item."""
    whole = prefix[-1:] + action
    return prefix[:-1], whole[:-1], whole[1:]


def pack_rows(items: list[tuple[list[int], list[int]]], budget: int) -> list[list[Block]]:
    """Rows of blocks holding `items` in order; a row's input tokens never exceed `budget`."""
    rows: list[list[Block]] = []
    row_length = budget + 1  # forces the first row
    for index, (prefix, action) in enumerate(items):
        shared, inputs, targets = segment_of(prefix, action)
        if len(shared) + len(inputs) > budget:
            raise ValueError(f"item {index}: {len(shared) + len(inputs)} input tokens exceed the row budget {budget}")
        block = rows[-1][-1] if rows else None
        if block is not None and block.shared == shared and row_length + len(inputs) <= budget:
            row_length += len(inputs)
        else:
            block = Block(shared)
            if row_length + len(shared) + len(inputs) > budget:
                rows.append([])
                row_length = 0
            rows[-1].append(block)
            row_length += len(shared) + len(inputs)
        block.segments.append((inputs, targets))
        block.items.append(index)
    return rows


def row_length(row: list[Block]) -> int:
    return sum(block.length for block in row)


def collate_row(row: list[Block], length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """One packed row as a micro-batch of one sequence of `length` tokens: input_ids, labels,
    position_ids [1, length]; attention_mask [1, 1, length, length] (True: may not attend);
    loss_mask [segments, length] (row k: the targets of the row's k-th segment, in item order) and
    `items` [segments] (their item indices)."""
    ids, labels, positions, block_of, segment_of_token = [], [], [], [], []
    targets_at: list[tuple[int, int]] = []  # (start, count) of each segment's targets
    items: list[int] = []
    for b, block in enumerate(row):
        start = len(ids)
        prefix_next = block.shared[1:] + [block.segments[0][0][0] if block.segments[0][0] else pad_id]
        ids += block.shared
        labels += prefix_next[: len(block.shared)]
        positions += list(range(len(block.shared)))
        block_of += [b] * len(block.shared)
        segment_of_token += [0] * len(block.shared)
        for s, ((inputs, targets), item) in enumerate(zip(block.segments, block.items), start=1):
            targets_at.append((len(ids), len(inputs)))
            items.append(item)
            ids += inputs
            labels += targets
            positions += range(len(block.shared), len(block.shared) + len(inputs))
            block_of += [b] * len(inputs)
            segment_of_token += [s] * len(inputs)
        assert len(ids) - start == block.length
    used = len(ids)
    if used > length:
        raise ValueError(f"a packed row of {used} tokens does not fit the padded length {length}")
    pad = length - used
    ids, labels = ids + [pad_id] * pad, labels + [pad_id] * pad
    positions += range(pad)
    block_of += [len(row)] * pad  # padding is a block of its own (never a fully masked query)
    segment_of_token += [0] * pad
    loss_mask = torch.zeros((len(items), length), dtype=torch.float32)
    for k, (start, count) in enumerate(targets_at):
        loss_mask[k, start : start + count] = 1.0
    return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([positions]),
            "attention_mask": blocked_mask(torch.tensor(block_of), torch.tensor(segment_of_token)),
            "loss_mask": loss_mask, "items": torch.tensor(items, dtype=torch.long)}


def blocked_mask(block_of: torch.Tensor, segment_of_token: torch.Tensor) -> torch.Tensor:
    """[1, 1, S, S] boolean, True where query q may not see key k: allowed when k <= q, both in one
    block, and k is shared (segment 0) or in q's segment."""
    size = block_of.shape[0]
    causal = torch.ones((size, size), dtype=torch.bool).tril()
    same_block = block_of[:, None] == block_of[None, :]
    visible = (segment_of_token[None, :] == 0) | (segment_of_token[:, None] == segment_of_token[None, :])
    return ~(causal & same_block & visible)[None, None]

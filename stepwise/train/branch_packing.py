"""Packed branches for the `values` builder: a prefix once, then each of its branches, in rows of a
token budget, a value read at the last token of every branch.

A branched record is a prefix (a state's ids) and branches (each action's ids): its sequences are
prefix + branch, one per branch, as the advantage stage's next states are. A packed block holds the
prefix once (position ids 0..p-1) and, per branch, a segment of the branch's tokens with position
ids p.. continuing from it; each segment sees its block's prefix and itself (causally), never another
segment or block (`prefix_packing.blocked_mask`), so the value at a segment's last token is the one
the sequence prefix + branch gets in its own unpadded row. Blocks fill rows of at most `budget`
tokens in order; a record whose branches do not fit one row continues in a new block (its prefix
again) on the next row.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from stepwise.train.prefix_packing import blocked_mask


@dataclass
class BranchBlock:
    prefix: list[int]
    branches: list[list[int]] = field(default_factory=list)
    targets: list[float] = field(default_factory=list)

    @property
    def length(self) -> int:
        return len(self.prefix) + sum(len(branch) for branch in self.branches)


def pack_branches(sequences: list[dict], budget: int) -> list[list[BranchBlock]]:
    """Rows of blocks holding the branches of `sequences` (`{"ids": prefix, "branches", "targets"}`) in
    order; a row never exceeds `budget` tokens (each prefix + branch must fit one)."""
    rows: list[list[BranchBlock]] = []
    used = budget + 1  # forces the first row
    for index, sequence in enumerate(sequences):
        prefix, block = sequence["ids"], None
        for branch, target in zip(sequence["branches"], sequence["targets"]):
            if len(prefix) + len(branch) > budget:
                raise ValueError(f"sequence {index}: prefix + branch of {len(prefix) + len(branch)} tokens exceed "
                                 f"the row budget {budget}")
            if block is None or used + len(branch) > budget:
                if used + len(prefix) + len(branch) > budget:
                    rows.append([])
                    used = 0
                block = BranchBlock(prefix)
                rows[-1].append(block)
                used += len(prefix)
            block.branches.append(branch)
            block.targets.append(target)
            used += len(branch)
    return rows


def row_length(row: list[BranchBlock]) -> int:
    return sum(block.length for block in row)


def collate_branch_row(row: list[BranchBlock], length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """One packed row as a micro-batch of one sequence of `length` tokens: input_ids, labels,
    position_ids, value_mask and value_target [1, length] (a 1 at each branch's last token, in order)
    and attention_mask [1, 1, length, length] (True: may not attend)."""
    ids, positions, block_of, segment_of_token, reads, targets = [], [], [], [], [], []
    for b, block in enumerate(row):
        ids += block.prefix
        positions += range(len(block.prefix))
        block_of += [b] * len(block.prefix)
        segment_of_token += [0] * len(block.prefix)
        for s, (branch, target) in enumerate(zip(block.branches, block.targets), start=1):
            ids += branch
            positions += range(len(block.prefix), len(block.prefix) + len(branch))
            block_of += [b] * len(branch)
            segment_of_token += [s] * len(branch)
            reads.append(len(ids) - 1)
            targets.append(target)
    if len(ids) > length:
        raise ValueError(f"a packed row of {len(ids)} tokens does not fit the padded length {length}")
    pad = length - len(ids)
    ids += [pad_id] * pad
    positions += range(pad)
    block_of += [len(row)] * pad  # padding is a block of its own (never a fully masked query)
    segment_of_token += [0] * pad
    value_mask = torch.zeros((1, length), dtype=torch.float32)
    value_target = torch.zeros((1, length), dtype=torch.float32)
    value_mask[0, reads] = 1.0
    value_target[0, reads] = torch.tensor(targets, dtype=torch.float32)
    input_ids = torch.tensor([ids])
    return {"input_ids": input_ids, "labels": input_ids.clone(), "position_ids": torch.tensor([positions]),
            "value_mask": value_mask, "value_target": value_target,
            "attention_mask": blocked_mask(torch.tensor(block_of), torch.tensor(segment_of_token))}

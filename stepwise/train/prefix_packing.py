"""Shared-prefix packing: a state's prefix once, then each of its actions, in rows of a token budget.

An item is (prefix ids, action ids), read as the next-token row prefix + action would be (inputs
ids[:-1], targets ids[1:], loss on the action's tokens). A packed block holds the prefix's first
p-1 tokens once (shared, no targets) and, per action, a segment whose inputs are the prefix's last
token followed by the action but its last token, with the action as targets: the token that predicts
an action's first token is the segment's own copy of the prefix's last token. Inside a row each
segment sees its block's shared tokens and itself (causally), never another segment or block, and
its position ids continue from the shared part, so every target sees exactly the context and the
positions it has in its own unpadded row. Blocks fill rows of at most `budget` input tokens in the
items' order (an item of a new prefix opens a new block; one that does not fit opens a new row, or
with `first_fit` goes to the first earlier row it fits).
Consecutive items may be tied into a group that never straddles two rows (a DPO pair: both halves in
one forward pass). The same layout packs whole samples (SFT, DPO, ...): an item is (prompt,
response), consecutive samples of one prompt share it, and samples of different prompts are blocks
that never see each other (block-diagonal causal attention, positions restarting at 0 per block).
Whole samples are packed first-fit into rows of the longest sample's padded length (`fit_longest`:
never longer than the unpacked batch's rows), several rows per micro-batch (`collate_rows`): its
`loss_mask` then spans the rows laid end to end ([segments, rows x S]), and `flat_rows` lays the
[rows, S] log-probs out the same way for a loss.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from stepwise.train.batches import LENGTH_MULTIPLE, pad_length


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


class RowBudgetError(ValueError):
    """An item, or a group of items that must share a row, exceeds the row budget."""


def pack_rows(items: list[tuple[list[int], list[int]]], budget: int,
              group_sizes: list[int] | None = None, first_fit: bool = False) -> list[list[Block]]:
    """Rows of blocks holding `items` in order; a row's input tokens never exceed `budget`. The items
    come in consecutive groups of `group_sizes` (default: one each) that each land in one row: the last
    row when it fits, else (`first_fit`) the first row it fits, else a new row."""
    sizes = group_sizes if group_sizes is not None else [1] * len(items)
    if sum(sizes) != len(items):
        raise ValueError(f"group sizes {sum(sizes)} do not add up to the {len(items)} items")
    segments = [segment_of(*item) for item in items]
    rows: list[list[Block]] = []
    lengths: list[int] = []  # input tokens of each row
    start = 0
    for size in sizes:
        group = range(start, start + size)
        start += size
        for target in range(len(rows)) if first_fit else range(max(0, len(rows) - 1), len(rows)):
            added = _added_length(rows[target], segments, group)
            if lengths[target] + added <= budget:
                break
        else:
            added = _added_length([], segments, group)
            if added > budget:
                what = f"item {group[0]}" if size == 1 else f"items {group[0]}..{group[-1]} (one group)"
                raise RowBudgetError(f"{what}: {added} input tokens exceed the row budget {budget}")
            rows.append([])
            lengths.append(0)
            target = len(rows) - 1
        lengths[target] += added
        _append(rows[target], segments, group)
    return rows


def _added_length(row: list[Block], segments: list[tuple[list[int], list[int], list[int]]], group: range) -> int:
    """Input tokens `segments[group]` (`segment_of` each item) add to `row`: each segment's inputs, and
    the shared part of each one that opens a new block."""
    shared = row[-1].shared if row else None
    added = 0
    for index in group:
        if segments[index][0] != shared:
            shared = segments[index][0]
            added += len(shared)
        added += len(segments[index][1])
    return added


def _append(row: list[Block], segments: list[tuple[list[int], list[int], list[int]]], group: range) -> None:
    """Put `segments[group]` at the end of `row`: in its last block when it has the segment's shared part,
    else in a new block."""
    for index in group:
        shared, inputs, targets = segments[index]
        if not row or row[-1].shared != shared:
            row.append(Block(shared))
        row[-1].segments.append((inputs, targets))
        row[-1].items.append(index)


def row_length(row: list[Block]) -> int:
    return sum(block.length for block in row)


def _row_lists(row: list[Block], length: int, pad_id: int) -> dict[str, list]:
    """One packed row of `length` tokens as lists: ids, labels, positions, block and segment of each
    token, (start, count) of each segment's targets, and each segment's item."""
    ids, labels, positions, block_of, segment_of_token = [], [], [], [], []
    targets_at: list[tuple[int, int]] = []
    items: list[int] = []
    for b, block in enumerate(row):
        start = len(ids)
        prefix_next = block.shared[1:] + [block.segments[0][0][0] if block.segments[0][0] else pad_id]
        ids += block.shared
        labels += prefix_next[: len(block.shared)]
        positions += range(len(block.shared))
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
    positions += range(pad)
    block_of += [len(row)] * pad  # padding is a block of its own (never a fully masked query)
    return {"input_ids": ids + [pad_id] * pad, "labels": labels + [pad_id] * pad, "position_ids": positions,
            "block_of": block_of, "segment_of_token": segment_of_token + [0] * pad, "targets_at": targets_at,
            "items": items}


def collate_rows(rows: list[list[Block]], length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Packed rows of `length` tokens as one micro-batch of R rows: input_ids, labels, position_ids [R, S];
    attention_mask [R, 1, S, S] (True: may not attend); `items` [segments] ascending, and `loss_mask`
    [segments, R x S], row k the targets of item items[k] over its row's columns of the rows laid end to
    end (one row: [segments, S])."""
    parts = [_row_lists(row, length, pad_id) for row in rows]
    batch = {key: torch.tensor([part[key] for part in parts]) for key in ("input_ids", "labels", "position_ids")}
    batch["attention_mask"] = blocked_mask(torch.tensor([part["block_of"] for part in parts]),
                                           torch.tensor([part["segment_of_token"] for part in parts]))
    spans = [(r * length + start, count) for r, part in enumerate(parts) for start, count in part["targets_at"]]
    items = [item for part in parts for item in part["items"]]
    order = sorted(range(len(items)), key=items.__getitem__)  # segments in item order
    loss_mask = torch.zeros((len(items), len(parts) * length), dtype=torch.float32)
    for k, segment in enumerate(order):
        start, count = spans[segment]
        loss_mask[k, start : start + count] = 1.0
    batch["loss_mask"] = loss_mask
    batch["items"] = torch.tensor([items[segment] for segment in order], dtype=torch.long)
    return batch


def collate_row(row: list[Block], length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """One packed row as a micro-batch of one sequence (`collate_rows` of one row): loss_mask
    [segments, length], row k the targets of the row's k-th segment in item order."""
    return collate_rows([row], length, pad_id)


def blocked_mask(block_of: torch.Tensor, segment_of_token: torch.Tensor) -> torch.Tensor:
    """[R, 1, S, S] boolean from [R, S] (or [S]: R = 1) block and segment ids, True where query q may not
    see key k: allowed when k <= q, both in one block, and k is shared (segment 0) or in q's segment."""
    if block_of.dim() == 1:
        block_of, segment_of_token = block_of[None], segment_of_token[None]
    position = torch.arange(block_of.shape[-1])
    causal = position[None, :] <= position[:, None]
    same_block = block_of[:, :, None] == block_of[:, None, :]
    visible = (segment_of_token[:, None, :] == 0) | (segment_of_token[:, :, None] == segment_of_token[:, None, :])
    return ~(causal & same_block & visible)[:, None]


def item_of(sequence: dict) -> tuple[list[int], list[int]]:
    """(prefix, targets) of a token record `{"ids", "mask"}`: the tokens before its first target, the rest."""
    ids, mask = sequence["ids"], sequence["mask"]
    prefix = mask.index(1) if 1 in mask else len(ids)
    return ids[:prefix], ids[prefix:]


class RowPacker:
    """`pack_rows` of a global batch, kept for the last one asked (`tokens` and `micro_batches` ask for
    the same global batch in turn); None when a group does not fit the budget (the caller then
    collates that global batch unpacked, as exact). With `fit_longest` the budget is the longest
    group's length alone, rounded up to `multiple` (at most `budget`), and rows are filled first-fit
    (single samples: never more rows, nor longer ones, than the batch unpacked; a row of pairs may be
    longer than the pairs' unpacked rows, at least two of which it replaces)."""

    def __init__(self, budget: int, fit_longest: bool = False):
        self.budget = budget
        self.fit_longest = fit_longest
        self._last: tuple[tuple, list[list[Block]] | None] | None = None

    def rows(self, key: tuple, items_of: Callable[[], tuple[list, list[int] | None]],
             multiple: int = LENGTH_MULTIPLE) -> list[list[Block]] | None:
        if self._last is None or self._last[0] != key:
            items, group_sizes = items_of()
            budget = self.budget
            if self.fit_longest:
                budget = pad_length(_group_lengths(items, group_sizes) or [1], self.budget, multiple)
            try:
                rows = pack_rows(items, budget, group_sizes, first_fit=self.fit_longest)
            except RowBudgetError:
                rows = None
            self._last = (key, rows)
        return self._last[1]


def _group_lengths(items: list[tuple[list[int], list[int]]], group_sizes: list[int] | None) -> list[int]:
    """The input tokens of each group of `items` packed alone."""
    starts = [0]
    for size in group_sizes if group_sizes is not None else [1] * len(items):
        starts.append(starts[-1] + size)
    segments = [segment_of(*item) for item in items]
    return [_added_length([], segments, range(a, b)) for a, b in zip(starts, starts[1:])]


def stacked_rank_rows(rows: list[list], dp_rank: int, dp_size: int, rows_per_micro_batch: int,
                      collate: Callable[[list[list]], dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """This DP rank's micro-batches of a global batch's packed `rows` (of any packing): a contiguous run
    of them (an empty rank gets one empty row), `collate`d `rows_per_micro_batch` at a time."""
    mine = rows[dp_rank * len(rows) // dp_size : (dp_rank + 1) * len(rows) // dp_size] or [[]]
    return [collate(mine[start : start + rows_per_micro_batch]) for start in range(0, len(mine), rows_per_micro_batch)]


def rank_rows(rows: list[list[Block]], dp_rank: int, dp_size: int, pad_id: int, max_seq_len: int,
              multiple: int = LENGTH_MULTIPLE, rows_per_micro_batch: int = 1) -> list[dict[str, torch.Tensor]]:
    """`stacked_rank_rows` of shared-prefix rows, each collated (`collate_rows`, with `items`; an empty
    row without segments) at the length every rank pads to, as pipeline schedules need."""
    length = pad_length([max(2, row_length(row)) for row in rows] or [2], max_seq_len, multiple)
    return stacked_rank_rows(rows, dp_rank, dp_size, rows_per_micro_batch,
                             lambda chunk: collate_rows(chunk, length, pad_id))


def builder_micro_batches(builder, rows: list[list[Block]], dp_rank: int, dp_size: int) -> list[dict[str, torch.Tensor]]:
    """`rank_rows` of a sample-packing batch builder (its pad id, length cap and multiple), stacking up to
    its `micro_batch_size` rows to a micro-batch."""
    return rank_rows(rows, dp_rank, dp_size, builder.pad_id, builder.max_seq_len, builder.length_multiple,
                     builder.micro_batch_size)


def read_positions(loss_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[R, S] where a loss reads log-probs: `loss_mask` > 0, any of a packed micro-batch's segment rows."""
    read = loss_mask > 0
    return read if read.shape == labels.shape else read.any(dim=0).reshape(labels.shape)


def segment_values(loss_mask: torch.Tensor, values: list[list[float]]) -> torch.Tensor:
    """Per-target numbers laid out as `loss_mask` [segments, W]: row k holds `values[k]` at row k's targets."""
    out = torch.zeros(loss_mask.shape, dtype=torch.float32)
    for k, numbers in enumerate(values):
        targets = loss_mask[k] > 0
        if int(targets.sum()) != len(numbers):
            raise ValueError(f"segment {k}: {len(numbers)} numbers for {int(targets.sum())} targets")
        out[k, targets] = torch.tensor(numbers, dtype=torch.float32)
    return out


def flat_rows(tensor: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Per-token `tensor` [R, S] as `loss_mask` lays it out: [1, R x S] for stacked packed rows, else as is."""
    return tensor.reshape(1, -1) if loss_mask.shape[-1] != tensor.shape[-1] else tensor

"""Packed-row attention as one small SDPA per segment instead of one masked SDPA over the whole row.

The packing layouts (`stepwise.train.prefix_packing`) give every query a key set of one shape: an
optional shared range [shared_lo, shared_hi) of its block (a prefix several segments read) and its own
run [run_start, q] up to itself. `segment_layout` reads that shape off a megatron-convention mask
(True: may not attend), checks that it reproduces the mask exactly, and groups consecutive queries of
one key set into pieces; `segment_sdpa` then attends each piece to its own keys only: a causal kernel
where the piece starts its run without a shared range, else a small lower-right causal mask. The work
is the sum of the pieces' squares, not the row's square, and no [S, S] mask reaches a kernel. A mask
of any other shape gives None, and the caller keeps the whole-row masked kernel. Each piece is one
kernel call, whose fixed cost outweighs the saved work in short rows: below `MIN_ROW_LENGTH` tokens the
whole-row masked kernel is used.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


MIN_ROW_LENGTH = 512  # forward + backward, 8 rows of 2-8 packed samples, 4 heads of 32, one CPU thread
# (2026-12-02, benchmarks/RESULTS.md): per-piece / masked time 3.7-6.1x at 64 tokens, 1.2-1.5x at 256,
# 0.59-0.95x at 512, 0.42-0.59x at 1,024


@dataclass(frozen=True)
class Piece:
    """Queries [start, end) of a row, each seeing keys [shared_lo, shared_hi) and [run_start, itself]."""
    start: int
    end: int
    shared_lo: int
    shared_hi: int
    run_start: int


def row_pieces(visible: torch.Tensor) -> list[Piece] | None:
    """The pieces of one row's [S, S] `visible` (True: query may see key), or None when some query's
    keys are not one shared range plus its own causal run (or it sees nothing, or not itself).

    A query that sees its predecessor continues its run, else starts one (the sub-diagonal); a layout
    whose runs do not chain so is not read (None), though it may have the shape. A query's
    shared range starts at its first visible key and holds whatever else it sees (its count). The
    candidate is exact when every key it names is visible and the counts agree: one prefix sum and one
    argmax over the mask, the rest per query."""
    size = visible.shape[0]
    if not bool(visible.diagonal().all()):
        return None
    queries = torch.arange(size, device=visible.device)
    as_bytes = visible.view(torch.uint8)
    seen_before = F.pad(as_bytes.cumsum(dim=1, dtype=torch.int32), (1, 0))  # [S, S + 1]
    count = seen_before[:, -1]
    first = as_bytes.argmax(dim=1)
    starts_run = torch.ones(size, dtype=torch.bool, device=visible.device)
    starts_run[1:] = ~visible.diagonal(-1)
    run_start = torch.where(starts_run, queries, 0).cummax(dim=0).values
    run = queries - run_start + 1
    shared_hi = torch.where(first < run_start, first + count - run, first)
    if bool(((shared_hi < first) | (shared_hi > run_start)).any()):
        return None

    def seen(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:  # visible keys in [lo, hi) of each query
        return seen_before.gather(1, hi[:, None])[:, 0] - seen_before.gather(1, lo[:, None])[:, 0]

    exact = (seen(first, shared_hi) == shared_hi - first) & (seen(run_start, queries + 1) == run) & (
        count == shared_hi - first + run)
    if not bool(exact.all()):
        return None
    key_sets = torch.stack([first, shared_hi, run_start], dim=1)
    changes = (key_sets[1:] != key_sets[:-1]).any(dim=1).nonzero()[:, 0] + 1
    bounds = [0, *changes.tolist(), size]
    sets = key_sets[bounds[:-1]].tolist()
    return [Piece(a, b, lo, hi, run) for a, b, (lo, hi, run) in zip(bounds, bounds[1:], sets)]


def segment_layout(attention_mask: torch.Tensor) -> list[list[Piece]] | None:
    """`row_pieces` of each row of a [b, 1, S, S] mask (True: may not attend), or None if any row has none."""
    layout = []
    for row in attention_mask[:, 0]:
        pieces = row_pieces(~row)
        if pieces is None:
            return None
        layout.append(pieces)
    return layout


def per_row(layout: list[list[Piece]], rows: int) -> list[list[Piece]]:
    """`layout` for each of `rows` rows: a one-row layout is every row's (a mask broadcast over the batch)."""
    return layout * rows if len(layout) == 1 else layout


def sequence_bounds(layout: list[list[Piece]], rows: int, seq: int) -> list[int] | None:
    """Where each causal run of `rows` rows of `seq` tokens, laid end to end, starts, and the end of the
    last (THD's `cu_seqlens`), when every piece is a run of its own seeing no shared range (block-diagonal
    layouts: sequence packs, padding a block of its own); None when some piece reads a shared range
    (shared-prefix rows). A one-row layout is every row's (`per_row`)."""
    bounds = [0]
    for row, pieces in enumerate(per_row(layout, rows)):
        for piece in pieces:
            if piece.shared_hi > piece.shared_lo or piece.start != piece.run_start:
                return None
            bounds.append(row * seq + piece.end)
    return bounds


class LayoutCache:
    """The last mask's layout: every layer of a forward (and a recomputing backward) reads the same mask."""

    def __init__(self):
        self._mask: torch.Tensor | None = None
        self._layout: list[list[Piece]] | None = None

    def layout(self, attention_mask: torch.Tensor) -> list[list[Piece]] | None:
        if attention_mask is not self._mask:
            self._mask, self._layout = attention_mask, segment_layout(attention_mask)
        return self._layout


def piece_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, piece: Piece, dropout: float,
                    scale: float | None, gqa: bool) -> torch.Tensor:
    """One piece of one row, [1, heads, end - start, d] from the row's [1, heads, S, d] q, k, v (4-D: the
    CPU flash kernel takes no other; 3-D inputs fall back to the math path)."""
    query = q[:, :, piece.start : piece.end]
    shared = piece.shared_hi - piece.shared_lo
    if shared == 0 and piece.start == piece.run_start:
        own = slice(piece.start, piece.end)
        return F.scaled_dot_product_attention(query, k[:, :, own], v[:, :, own], is_causal=True, dropout_p=dropout,
                                              scale=scale, enable_gqa=gqa)
    parts = [slice(piece.shared_lo, piece.shared_hi), slice(piece.run_start, piece.end)]
    key, value = (torch.cat([t[:, :, part] for part in parts], dim=2) for t in (k, v))
    count, width = piece.end - piece.start, key.shape[2]
    reach = torch.arange(count, device=q.device)[:, None] + (width - count)  # lower-right causal
    allowed = torch.arange(width, device=q.device)[None, :] <= reach
    return F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, dropout_p=dropout, scale=scale,
                                          enable_gqa=gqa)


def segment_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: list[list[Piece]], dropout: float,
                 scale: float | None) -> torch.Tensor:
    """Attention of [b, heads, S, d] q (k, v: a divisor of its heads) row by row, piece by piece."""
    gqa = k.shape[1] != q.shape[1]
    rows = [torch.cat([piece_attention(q[r : r + 1], k[r : r + 1], v[r : r + 1], piece, dropout, scale, gqa)
                       for piece in pieces], dim=2) for r, pieces in enumerate(per_row(layout, q.shape[0]))]
    return torch.cat(rows)

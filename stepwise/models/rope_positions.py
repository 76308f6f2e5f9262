"""Rotary embeddings at the batch's `position_ids`, not at 0..S-1.

megatron-core's GPTModel ignores `position_ids` under rope: it rotates token t by position t. Packed
rows (shared-prefix packing, `stepwise.train.prefix_packing`) restart or continue positions inside a
row, so `follow_position_ids` makes the rotary embedding read them: a forward pre-hook on the model
keeps the call's `position_ids`, and a forward hook on its `rotary_pos_emb` gathers the [S, 1, 1, D]
table at those positions into [S, B, 1, D] (megatron's unfused rope broadcasts over the batch
dimension). The table's rows are computed per position, so plain 0..S-1 ids give bitwise the same
rotation as before. megatron's fused rope (TE, `apply_rope_fusion`) expects [S, 1, 1, D]; the
builder keeps it off.
"""
from __future__ import annotations

import torch


def gather_rotary(table: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """[n, 1, 1, D] rotary table at [B, S] `position_ids` (each < n) -> [S, B, 1, D]."""
    return table[:, 0, 0, :][position_ids.t()].unsqueeze(2)


def follow_position_ids(model) -> None:
    """Make `model`'s (a GPTModel) rope rotate each token by its entry in the forward's `position_ids`."""
    rotary = getattr(model, "rotary_pos_emb", None)
    if rotary is None:
        return
    state: dict[str, torch.Tensor | None] = {"position_ids": None}

    def keep_positions(module, args, kwargs):
        state["position_ids"] = kwargs.get("position_ids", args[1] if len(args) > 1 else None)

    def rotate_at_positions(module, args, output):
        positions = state["position_ids"]
        if positions is None or not isinstance(output, torch.Tensor) or output.dim() != 4:
            return output
        needed = int(positions.max()) + 1
        table = output if output.shape[0] >= needed else module.get_emb(needed)
        return gather_rotary(table, positions.to(table.device))

    model.register_forward_pre_hook(keep_positions, with_kwargs=True)
    rotary.register_forward_hook(rotate_at_positions)

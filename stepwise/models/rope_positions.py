"""Rotary embeddings at the batch's `position_ids`, not at 0..S-1, and a cheaper unfused rope.

megatron-core's GPTModel ignores `position_ids` under rope: it rotates token t by position t. Packed
rows (shared-prefix packing, `stepwise.train.prefix_packing`) restart or continue positions inside a
row, so `follow_position_ids` makes the rotary embedding read them: a forward pre-hook on the model
keeps the call's `position_ids`, and a forward hook on its `rotary_pos_emb` gathers the [S, 1, 1, D]
table at those positions into [S, B, 1, D] (megatron's unfused rope broadcasts over the batch
dimension), or into [S, 1, 1, D] when every row has the same positions (the usual unpacked batch:
B times less cos/sin work, the same broadcast values). The table's rows are computed per position,
so plain 0..S-1 ids give bitwise the same rotation as before. megatron's fused rope (TE,
`apply_rope_fusion`) expects [S, 1, 1, D]; the builder keeps it off.

`lean_unfused_rope` replaces megatron's unfused bshd rope with the same arithmetic, minus these costs:
cos/sin of the frequencies are computed once per forward (megatron: per layer, for query and key),
and a rotation over the whole head dimension skips megatron's split and re-concatenation (a copy
forward, a zero-filled copy backward). On CPU (`_BatchMajorRope`) the rotation is written straight into
the [b, heads, s, d] memory the SDPA core attention reads (`attention.batch_major`: then no copy), and
its backward runs without rotate_half's concatenations and full-width temporaries (bitwise the same values).
Partial rotation, interleaved rotation and multi-latent attention go to megatron's.
"""
from __future__ import annotations

import torch

_COS_SIN: dict = {}  # the last (freqs, mscale, dtype) -> (cos, sin); holds freqs, so its id stays unique


def gather_rotary(table: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """[n, 1, 1, D] rotary table at [B, S] `position_ids` (each < n) -> [S, B, 1, D]."""
    return table[:, 0, 0, :][position_ids.t()].unsqueeze(2)


def rotary_at_positions(table: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """`gather_rotary`, as [S, 1, 1, D] (broadcast over the batch) when every row has row 0's positions."""
    if position_ids.shape[0] > 1 and bool((position_ids == position_ids[:1]).all()):
        position_ids = position_ids[:1]
    return gather_rotary(table, position_ids)


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
        return rotary_at_positions(table, positions.to(table.device))

    model.register_forward_pre_hook(keep_positions, with_kwargs=True)
    rotary.register_forward_hook(rotate_at_positions)


def cos_sin(freqs: torch.Tensor, mscale: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """megatron's `(cos(freqs) * mscale).to(dtype)` and the same for sin, reused while `freqs` is the
    same tensor (every layer of one forward gets the same one)."""
    key = (id(freqs), mscale, dtype)
    if key not in _COS_SIN:
        _COS_SIN.clear()
        _COS_SIN[key] = (freqs, (torch.cos(freqs) * mscale).to(dtype), (torch.sin(freqs) * mscale).to(dtype))
    return _COS_SIN[key][1:]


class _BatchMajorRope(torch.autograd.Function):
    """t * cos + rotate_half(t) * sin for t [s, b, h, d] (rotate_half(t) = [-t2, t1] over halves of d),
    returned as the [s, b, h, d] view of a new [b, h, s, d] tensor."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = t.shape[-1] // 2
        seq, batch, heads, dim = t.shape
        out = t.new_empty(batch, heads, seq, dim).permute(2, 0, 1, 3)
        torch.mul(t, cos, out=out)  # products rounded before the sums, as megatron's: bitwise its values
        out[..., :half].sub_(t[..., half:] * sin[..., :half])
        out[..., half:].add_(t[..., :half] * sin[..., half:])
        ctx.save_for_backward(cos, sin)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        half = grad.shape[-1] // 2
        grad_t = grad * cos
        grad_t[..., :half].add_(grad[..., half:] * sin[..., half:])
        grad_t[..., half:].sub_(grad[..., :half] * sin[..., :half])
        return grad_t, None, None


def lean_unfused_rope() -> None:
    """Install the lean bshd rope into megatron's rope_utils (idempotent; process-wide)."""
    from megatron.core.models.common.embeddings import rope_utils

    if getattr(rope_utils._apply_rotary_pos_emb_bshd, "is_lean", False):
        return
    megatron_bshd = rope_utils._apply_rotary_pos_emb_bshd

    def lean_bshd(t, freqs, rotary_interleaved=False, multi_latent_attention=False, mscale=1.0):
        if multi_latent_attention or freqs.shape[-1] != t.shape[-1] or freqs.requires_grad:
            return megatron_bshd(t, freqs, rotary_interleaved=rotary_interleaved,
                                 multi_latent_attention=multi_latent_attention, mscale=mscale)
        cos, sin = cos_sin(freqs, mscale, t.dtype)
        if not t.is_cuda and not rotary_interleaved:
            return _BatchMajorRope.apply(t, cos, sin)
        return (t * cos) + (rope_utils._rotate_half(t, rotary_interleaved) * sin)

    lean_bshd.is_lean, lean_bshd.megatron = True, megatron_bshd
    rope_utils._apply_rotary_pos_emb_bshd = lean_bshd

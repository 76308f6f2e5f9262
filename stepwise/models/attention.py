"""Core attention over `torch.nn.functional.scaled_dot_product_attention`, for when TE is absent.

megatron's local spec materialises the S x S scores (out of memory at S=2048 on an 80 GB GPU);
SDPA picks a fused flash / memory-efficient kernel on GPU and a blocked kernel on CPU. Causal by
default (the fast path), with GQA by SDPA's `enable_gqa` (key/value heads are not copied per query head;
CUDA's masked kernel lacks it, so there they are expanded to this TP rank's query heads).
Given an `attention_mask` (megatron's convention: boolean [b, 1, s, s], True where a query must NOT
see a key; the causal part included), the mask is used instead of causality: shared-prefix packing
(`stepwise.train.prefix_packing`) lets each action see its state's prefix and itself only. On CPU a
packed row of at least `segment_attention.MIN_ROW_LENGTH` tokens has its mask read as segments
(`segment_attention`), each attending to its own keys only;
on CUDA the masked kernel takes the whole row (the per-segment form is not measured there: no GPU).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

from stepwise.models.segment_attention import MIN_ROW_LENGTH, LayoutCache, segment_sdpa

PACKED_LAYOUTS = LayoutCache()  # every layer of a forward reads one mask: its layout is found once


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask: torch.Tensor | None,
         dropout: float, scale: float | None) -> torch.Tensor:
    """SDPA over [b, heads, s, d] (k, v may have fewer heads, a divisor of q's: GQA): causal without a
    mask, else the megatron-convention boolean mask."""
    if attention_mask is not None and (attention_mask.dtype != torch.bool or attention_mask.dim() != 4):
        raise ValueError(f"attention_mask must be a boolean [b, 1, s, s] tensor, got {attention_mask.dtype} "
                         f"{tuple(attention_mask.shape)}")
    groups = q.shape[1] // k.shape[1]
    if groups > 1 and attention_mask is not None and q.is_cuda:
        # CUDA only (not run here, no GPU): its masked kernel takes no enable_gqa (SDPA would fall back to math)
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    gqa = k.shape[1] != q.shape[1]
    per_segment = attention_mask is not None and not q.is_cuda and q.shape[2] >= MIN_ROW_LENGTH
    layout = PACKED_LAYOUTS.layout(attention_mask) if per_segment else None
    if layout is not None:
        return segment_sdpa(q, k, v, layout, dropout, scale)
    if attention_mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, scale=scale, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=~attention_mask, dropout_p=dropout, scale=scale,
                                          enable_gqa=gqa)


def batch_major(t: torch.Tensor) -> torch.Tensor:
    """[s, b, heads, d] as [b, heads, s, d]. On CPU contiguous in that order (a copy, except for query and
    key, which the CPU rope already writes so: `rope_positions`): the CPU kernel then reads each head's
    keys as one block. Measured (benchmarks/RESULTS.md): the engine's SFT step 1.7% faster with [b, s,
    heads, d] memory than with the strided [s, b] view, and one layer's attention forward and backward 6%
    faster again with [b, heads, s, d]. CUDA kernels take the strided view."""
    if t.is_cuda:
        return t.permute(1, 2, 0, 3)
    return t.permute(1, 2, 0, 3).contiguous()


def core_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
                   dropout: float, scale: float | None) -> torch.Tensor:
    """megatron's core-attention contract over `sdpa`: [s, b, heads, d] query/key/value in (key, value may
    have fewer heads), [s, b, heads * d] out."""
    q, k, v = (batch_major(t) for t in (query, key, value))  # [b, heads, s, d]
    out = sdpa(q, k, v, attention_mask, dropout, scale)
    seq, batch = out.shape[2], out.shape[0]
    # contiguous here, once: else linear_proj's matmul copies it and its backward copies it again
    return out.permute(2, 0, 1, 3).reshape(seq, batch, -1).contiguous()


class SDPAttention(MegatronModule):
    """[s, b, heads, d] query/key/value in, [s, b, heads * d] out; causal, or `attention_mask`."""

    def __init__(
        self,
        config,
        layer_number,
        attn_mask_type,
        attention_type,
        attention_dropout=None,
        softmax_scale=None,
        cp_comm_type=None,
        model_comm_pgs=None,
        pg_collection=None,
        **kwargs,
    ):
        super().__init__(config=config)
        self.softmax_scale = softmax_scale
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None:
            raise NotImplementedError("packed sequences need Transformer Engine attention")
        return core_attention(query, key, value, attention_mask, self.dropout if self.training else 0.0,
                              self.softmax_scale)

"""Core attention over `torch.nn.functional.scaled_dot_product_attention`, for when TE is absent.

megatron's local spec materialises the S x S scores (out of memory at S=2048 on an 80 GB GPU);
SDPA picks a fused flash / memory-efficient kernel on GPU and a blocked kernel on CPU. Causal,
with GQA (key/value heads are expanded to the query heads of this TP rank).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule


class SDPAttention(MegatronModule):
    """[s, b, heads, d] query/key/value in, [s, b, heads * d] out; causal."""

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
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        if k.shape[1] != q.shape[1]:
            groups = q.shape[1] // k.shape[1]
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0, scale=self.softmax_scale
        )
        seq, batch = out.shape[2], out.shape[0]
        return out.permute(2, 0, 1, 3).reshape(seq, batch, -1)

"""A CPU stand-in for megatron's `TEDotProductAttention` (TE needs CUDA): its constructor and forward
signature, causal attention only, any mask ignored (as TE's fused backends do under megatron's causal
mask type), THD `packed_seq_params` as TE reads them (causal attention within each `cu_seqlens`
sequence of [t, heads, d] inputs, [t, heads * d] out, in fp32 too), its calls and THD parameters
recorded. `stand_in_te_spec` puts it, wrapped by `stepwise.models.te_packed_attention`, into the local
layer spec, so a whole model runs TE's dispatch."""
from __future__ import annotations

import torch

from stepwise.models.attention import core_attention


class StandInTEAttention(torch.nn.Module):
    thd_dtypes = (torch.float32, torch.bfloat16)  # TE's THD backends take no fp32; this one does (CPU tests)

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type="p2p", pg_collection=None):
        super().__init__()
        self.config, self.softmax_scale, self.calls, self.packed = config, softmax_scale, 0, []

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        self.calls += 1
        if packed_seq_params is None:
            return core_attention(query, key, value, None, 0.0, self.softmax_scale)
        self.packed.append((attn_mask_type, packed_seq_params))
        assert packed_seq_params.qkv_format == "thd" and query.dim() == 3, "THD takes [t, heads, d]"
        bounds = packed_seq_params.cu_seqlens_q.tolist()
        assert bounds[-1] == query.shape[0] and packed_seq_params.cu_seqlens_kv.tolist() == bounds
        assert packed_seq_params.max_seqlen_q == max(b - a for a, b in zip(bounds, bounds[1:]))
        sequences = [[t[a:b, None] for t in (query, key, value)] for a, b in zip(bounds, bounds[1:])]
        return torch.cat([core_attention(*qkv, None, 0.0, self.softmax_scale)[:, 0] for qkv in sequences])


def stand_in_te_spec(local_layer_spec):
    """A `builder.layer_spec` replacement: the local spec with the stand-in's masked-SDPA subclass as
    its core attention."""
    from stepwise.models.te_packed_attention import take_masks

    def layer_spec(options, config=None):
        spec = local_layer_spec(options, config)
        spec.submodules.self_attention.submodules.core_attention = StandInTEAttention
        return take_masks(spec)

    return layer_spec

"""A CPU stand-in for megatron's `TEDotProductAttention` (TE needs CUDA): its constructor and forward
signature, causal attention only, any mask ignored (as TE's fused backends do under megatron's causal
mask type), its calls counted. `stand_in_te_spec` puts it, wrapped by
`stepwise.models.te_packed_attention`, into the local layer spec, so a whole model runs TE's dispatch."""
from __future__ import annotations

import torch

from stepwise.models.attention import core_attention


class StandInTEAttention(torch.nn.Module):
    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type="p2p", pg_collection=None):
        super().__init__()
        self.config, self.calls = config, 0

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        self.calls += 1
        return core_attention(query, key, value, None, 0.0, None)


def stand_in_te_spec(local_layer_spec):
    """A `builder.layer_spec` replacement: the local spec with the stand-in's masked-SDPA subclass as
    its core attention."""
    from stepwise.models.te_packed_attention import take_masks

    def layer_spec(options, config=None):
        spec = local_layer_spec(options, config)
        spec.submodules.self_attention.submodules.core_attention = StandInTEAttention
        return take_masks(spec)

    return layer_spec

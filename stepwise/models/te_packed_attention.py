"""Packed rows under Transformer Engine: TE's fused attention for causal batches, SDPA for masked ones.

TE's fused and flash backends take causal, padding and THD (`cu_seqlens`) batches. A packed row here
carries an arbitrary mask instead (`stepwise.train.prefix_packing`): shared-prefix rows, where each
action sees its state's prefix and itself, are not block-diagonal, so they have no THD form. Given an
arbitrary mask, TE falls back to its unfused backend, which holds the [b, heads, S, S] scores in memory.

`with_masked_sdpa(TE's core-attention class)` is the class the TE layer spec builds instead. A call with
an `attention_mask` goes to `stepwise.models.attention.core_attention`. On CUDA that is torch's
memory-efficient SDPA kernel, which takes a boolean mask and needs O(S) memory besides it. Every other
call (unpacked batches, THD `packed_seq_params`) goes to TE, unchanged. The class is TE's own
subclass: its `_extra_state`, its checkpoint keys and its FP8 state are TE's, so a checkpoint moves
between packed and unpacked stages as before. The linears, norms and FP8 GEMMs stay TE's either way.

Not run here: no GPU or Transformer Engine was lent to this task (benchmarks/RESULTS.md). The dispatch
and the masked path run over a stand-in TE class (tests/te_stand_in.py), alone in
tests/unit/test_te_packed_attention.py and in a whole model in tests/integration/test_prefix_packing.py;
tests/gpu/test_te.py checks packed against unpacked gradients on TE.
"""
from __future__ import annotations

import functools

import torch

from stepwise.models.attention import core_attention


@functools.cache
def with_masked_sdpa(te_attention: type) -> type:
    """A subclass of `te_attention` (megatron's TEDotProductAttention, or a stand-in with its
    constructor and forward signature) that sends masked calls to SDPA."""

    class MaskedSDPA(te_attention):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.masked_softmax_scale = kwargs.get("softmax_scale")
            dropout = kwargs.get("attention_dropout")
            self.masked_dropout = self.config.attention_dropout if dropout is None else dropout

        def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask, *args,
                    **kwargs) -> torch.Tensor:
            if attention_mask is None:
                return super().forward(query, key, value, attention_mask, *args, **kwargs)
            if kwargs.get("packed_seq_params") is not None:
                raise ValueError("a batch carries both an attention mask and THD packed_seq_params")
            return core_attention(query, key, value, attention_mask, self.masked_dropout if self.training else 0.0,
                                  self.masked_softmax_scale)

    MaskedSDPA.__name__ = MaskedSDPA.__qualname__ = f"{te_attention.__name__}WithMaskedSDPA"
    MaskedSDPA.__module__ = __name__
    return MaskedSDPA


def take_masks(spec):
    """`spec` (a TE decoder-layer ModuleSpec) with its core attention answering masked calls by SDPA."""
    attention = spec.submodules.self_attention.submodules
    attention.core_attention = with_masked_sdpa(attention.core_attention)
    return spec

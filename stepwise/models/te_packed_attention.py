"""Packed rows under Transformer Engine: TE's fused attention for causal batches and sequence packs,
SDPA for shared-prefix rows.

TE's fused and flash backends take causal, padding and THD (`cu_seqlens`) batches; given an arbitrary
mask, TE falls back to its unfused backend, which holds the [b, heads, S, S] scores in memory. A packed
row here carries a mask (`stepwise.train.prefix_packing`), read once per forward as segments
(`segment_attention`, cached across layers):
- block-diagonal rows (sequence packs of SFT, KTO, DQO/DRO and critic batches: each sample sees
  itself only, the padding a block of its own) in bf16 or fp16 go to TE as THD: the rows laid end to
  end, one sequence per sample, `cu_seqlens` from the segments, TE's `padding_causal` mask type. TE's
  THD backends (fused, flash) take no fp32, and its unfused one no THD: fp32 rows take SDPA;
- rows where several segments read one shared range (Skywork DAPO's shared-prefix rows: each action
  sees its state's prefix and itself; DPO's pairs: each answer sees the prompt once) have no THD form
  and go to `stepwise.models.attention.core_attention`: on CUDA torch's memory-efficient SDPA kernel,
  which takes a boolean mask and needs O(S) memory besides it.

`with_masked_sdpa(TE's core-attention class)` is the class the TE layer spec builds instead. Unmasked
calls (and THD `packed_seq_params` from elsewhere) go to TE unchanged. The class is TE's own subclass:
its `_extra_state`, its checkpoint keys and its FP8 state are TE's, so a checkpoint moves between packed
and unpacked stages as before. The linears, norms and FP8 GEMMs stay TE's either way. Rotary embeddings
are applied before core attention from each sample's own position ids, so THD needs nothing else.

Not run here: no GPU or Transformer Engine was lent to this task (benchmarks/RESULTS.md). The dispatch,
the THD layout and the masked path run over a stand-in TE class (tests/te_stand_in.py, whose THD
attention is causal attention per `cu_seqlens` sequence), alone in tests/unit/test_te_packed_attention.py
and in a whole model in tests/integration/test_prefix_packing.py; tests/gpu/test_te.py checks packed
against unpacked gradients on TE.
"""
from __future__ import annotations

import functools

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType

from stepwise.models.attention import PACKED_LAYOUTS, core_attention
from stepwise.models.segment_attention import sequence_bounds

THD_DTYPES = (torch.bfloat16, torch.float16)  # TE's fused and flash backends; a TE class may name its own


@functools.cache
def with_masked_sdpa(te_attention: type) -> type:
    """A subclass of `te_attention` (megatron's TEDotProductAttention, or a stand-in with its
    constructor and forward signature) that sends block-diagonal masked calls to TE as THD and other
    masked calls to SDPA."""

    thd_dtypes = getattr(te_attention, "thd_dtypes", THD_DTYPES)

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
            bounds = self.thd_bounds(query, attention_mask)
            if bounds is not None:
                return self.packed_forward(query, key, value, bounds)
            return core_attention(query, key, value, attention_mask, self.masked_dropout if self.training else 0.0,
                                  self.masked_softmax_scale)

        @staticmethod
        def thd_bounds(query: torch.Tensor, attention_mask: torch.Tensor) -> list[int] | None:
            """THD's `cu_seqlens` of the [s, b, ...] rows `attention_mask` packs, or None where TE takes
            no THD (the dtype) or the rows are not block-diagonal."""
            if query.dtype not in thd_dtypes:
                return None
            layout = PACKED_LAYOUTS.layout(attention_mask)
            seq, rows = query.shape[:2]
            return None if layout is None else sequence_bounds(layout, rows, seq)

        def packed_forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           bounds: list[int]) -> torch.Tensor:
            """TE's attention over [s, b, heads, d] rows as THD sequences starting at `bounds`
            (`thd_bounds`); [s, b, heads * d] out, as megatron's core attention returns."""
            seq, rows = query.shape[:2]
            # [t, heads, d], row after row (a view when b = 1, else a copy in the rows' order)
            query, key, value = (t.transpose(0, 1).reshape(rows * seq, *t.shape[2:]) for t in (query, key, value))
            cu_seqlens = torch.tensor(bounds, dtype=torch.int32, device=query.device)
            longest = max(end - start for start, end in zip(bounds, bounds[1:]))
            params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                                     max_seqlen_q=longest, max_seqlen_kv=longest)
            out = super().forward(query, key, value, None, attn_mask_type=AttnMaskType.padding_causal,
                                  packed_seq_params=params)
            return out.reshape(rows, seq, -1).transpose(0, 1)

    MaskedSDPA.__name__ = MaskedSDPA.__qualname__ = f"{te_attention.__name__}WithMaskedSDPA"
    MaskedSDPA.__module__ = __name__
    return MaskedSDPA


def take_masks(spec):
    """`spec` (a TE decoder-layer ModuleSpec) with its core attention answering masked calls (THD or SDPA)."""
    attention = spec.submodules.self_attention.submodules
    attention.core_attention = with_masked_sdpa(attention.core_attention)
    return spec

"""Packed rows under Transformer Engine's spec (`stepwise.models.te_packed_attention`), on CPU over a
stand-in for TE's core attention (TE needs CUDA): unmasked calls reach TE's class untouched, masked ones
attend exactly as the unpacked samples would, and the TE spec keeps its module paths (its checkpoint keys)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megatron.core.transformer.enums import AttnMaskType

from stepwise.models.attention import core_attention
from stepwise.models.te_packed_attention import THD_DTYPES, take_masks, with_masked_sdpa
from stepwise.train.prefix_packing import blocked_mask
from tests.te_stand_in import StandInTEAttention


def build(softmax_scale=None):
    cls = with_masked_sdpa(StandInTEAttention)
    return cls(config=SimpleNamespace(attention_dropout=0.0), layer_number=1, attn_mask_type="causal",
               attention_type="self", softmax_scale=softmax_scale)


def qkv(seq: int, generator: torch.Generator):
    """[seq, 1, heads, 16] query (4 heads), key and value (2 heads: GQA), requiring gradients."""
    shapes = ((seq, 1, 4, 16), (seq, 1, 2, 16), (seq, 1, 2, 16))
    return [torch.randn(shape, generator=generator, requires_grad=True) for shape in shapes]


def test_the_class_is_te_s_own_subclass_and_unmasked_calls_go_to_it():
    module = build()
    assert isinstance(module, StandInTEAttention)
    assert type(module).__name__ == "StandInTEAttentionWithMaskedSDPA"
    assert with_masked_sdpa(StandInTEAttention) is type(module)  # one class per TE class
    q, k, v = qkv(6, torch.Generator().manual_seed(0))
    out = module(q, k, v, None, attn_mask_type="causal")
    assert module.calls == 1
    assert torch.equal(out, core_attention(q, k, v, None, 0.0, None))


def test_a_masked_row_attends_as_its_unpacked_samples():
    """A row holding a prefix of 5 tokens and two actions after it (4 and 3 tokens), each action seeing
    the prefix and itself: each action's outputs and the gradients equal causal attention over
    prefix + action alone."""
    generator = torch.Generator().manual_seed(1)
    prefix, actions = 5, (4, 3)
    seq = prefix + sum(actions)
    q, k, v = qkv(seq, generator)
    visible = torch.zeros(seq, seq, dtype=torch.bool)
    visible[:prefix, :prefix] = torch.ones(prefix, prefix).tril().bool()
    spans, start = [], prefix
    for length in actions:
        span = slice(start, start + length)
        visible[span, :prefix] = True
        visible[span, span] = torch.ones(length, length).tril().bool()
        spans.append(span)
        start += length
    module = build()
    packed = module(q, k, v, ~visible[None, None], attn_mask_type="causal")
    assert module.calls == 0  # TE's class never saw the masked call
    weights = torch.randn(packed.shape, generator=generator)
    grads = torch.autograd.grad((packed * weights).sum(), (q, k, v))
    for span in spans:
        rows = torch.cat([torch.arange(prefix), torch.arange(span.start, span.stop)])
        alone = [t.detach()[rows].requires_grad_() for t in (q, k, v)]
        out = core_attention(*alone, None, 0.0, None)
        torch.testing.assert_close(packed[span], out[prefix:], rtol=1e-5, atol=1e-6)
        # the action's own key/value gradients: only its queries read them, packed or not
        own = torch.autograd.grad((out[prefix:] * weights[span]).sum(), alone)
        for packed_grad, unpacked_grad in zip(grads, own):
            torch.testing.assert_close(packed_grad[span], unpacked_grad[prefix:], rtol=1e-5, atol=1e-6)


def test_sequence_packs_go_to_te_as_thd():
    """Two rows of 9 tokens: samples of 4 and 3 tokens and 2 of padding, a sample of 6 and 3 of padding.
    TE's class takes them as THD sequences (one per sample and padding, rows end to end) with its
    padding-causal mask type; outputs and gradients equal the masked kernel's."""
    generator = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(9, 2, heads, 16, generator=generator, requires_grad=True) for heads in (4, 2, 2))
    blocks = torch.tensor([[0] * 4 + [1] * 3 + [2] * 2, [0] * 6 + [1] * 3])
    mask = blocked_mask(blocks, torch.zeros_like(blocks))
    module = build()
    packed = module(q, k, v, mask, attn_mask_type="causal")
    assert module.calls == 1
    (mask_type, params), = module.packed
    assert mask_type == AttnMaskType.padding_causal
    assert params.cu_seqlens_q.tolist() == [0, 4, 7, 9, 15, 18] and params.cu_seqlens_q.dtype == torch.int32
    assert packed.shape == (9, 2, 4 * 16)
    weights = torch.randn(packed.shape, generator=generator)
    grads = torch.autograd.grad((packed * weights).sum(), (q, k, v))
    want = core_attention(q, k, v, mask, 0.0, None)
    want_grads = torch.autograd.grad((want * weights).sum(), (q, k, v))
    torch.testing.assert_close(packed, want, rtol=1e-5, atol=1e-6)
    for grad, want_grad in zip(grads, want_grads):
        torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-6)


def test_te_s_thd_backends_take_bf16_and_fp16_only():
    """Under TE's own THD dtypes fp32 rows take SDPA (TE's unfused backend has no THD), bf16 rows THD."""
    class FusedBackendsOnly(StandInTEAttention):
        thd_dtypes = THD_DTYPES

    module = with_masked_sdpa(FusedBackendsOnly)(config=SimpleNamespace(attention_dropout=0.0), layer_number=1,
                                                 attn_mask_type="causal", attention_type="self")
    mask = blocked_mask(torch.tensor([0, 0, 1, 1, 1]), torch.zeros(5, dtype=torch.long))
    q, k, v = qkv(5, torch.Generator().manual_seed(5))
    torch.testing.assert_close(module(q, k, v, mask), core_attention(q, k, v, mask, 0.0, None))
    assert module.calls == 0
    low = [t.detach().bfloat16() for t in (q, k, v)]
    torch.testing.assert_close(module(*low, mask), core_attention(*low, mask, 0.0, None))
    assert module.calls == 1 and module.packed[0][1].cu_seqlens_q.tolist() == [0, 2, 5]


@pytest.mark.parametrize("thd", [True, False])
def test_the_softmax_scale_megatron_passes_is_kept(thd):
    """Through TE's class (THD: one causal row) and through SDPA (a shared prefix)."""
    q, k, v = qkv(4, torch.Generator().manual_seed(2))
    segments = torch.tensor([0, 0, 0, 0] if thd else [0, 0, 1, 2])
    mask = blocked_mask(torch.zeros(4, dtype=torch.long), segments)
    module = build(softmax_scale=0.5)
    torch.testing.assert_close(module(q, k, v, mask), core_attention(q, k, v, mask, 0.0, 0.5))
    assert module.calls == thd
    assert not torch.allclose(build(softmax_scale=0.5)(q, k, v, mask), build()(q, k, v, mask))


def test_a_mask_with_thd_packed_params_is_refused():
    q, k, v = qkv(4, torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match="both an attention mask and THD"):
        build()(q, k, v, ~torch.ones(4, 4).tril().bool()[None, None], packed_seq_params=object())


def test_the_te_spec_keeps_its_module_paths():
    """The spec the builder takes under TE (megatron's, built here with placeholders for TE's classes):
    its core attention answers masks, and every TE path (each a checkpointed `_extra_state`) remains."""
    from stepwise.models.te_spec import placeholder_te_layer_spec, te_module_paths, te_modules_of

    spec = take_masks(placeholder_te_layer_spec())
    core = spec.submodules.self_attention.submodules.core_attention
    assert core.__name__ == "TEDotProductAttentionWithMaskedSDPA"
    assert te_modules_of(spec) == te_module_paths()

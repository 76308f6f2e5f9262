"""Packed rows under Transformer Engine's spec (`stepwise.models.te_packed_attention`), on CPU over a
stand-in for TE's core attention (TE needs CUDA): unmasked calls reach TE's class untouched, masked ones
attend exactly as the unpacked samples would, and the TE spec keeps its module paths (its checkpoint keys)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from stepwise.models.attention import core_attention
from stepwise.models.te_packed_attention import take_masks, with_masked_sdpa
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


def test_the_softmax_scale_megatron_passes_is_kept():
    q, k, v = qkv(4, torch.Generator().manual_seed(2))
    mask = ~torch.ones(4, 4).tril().bool()[None, None]
    torch.testing.assert_close(build(softmax_scale=0.5)(q, k, v, mask), core_attention(q, k, v, mask, 0.0, 0.5))
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

"""The SDPA core attention's GQA (`enable_gqa` instead of copying key/value heads) and the lean unfused
rope (`stepwise.models.rope_positions`) against what they replace: megatron's rope bitwise, GQA
forward bitwise and its key/value gradients within fp32 summation order."""
from __future__ import annotations

import torch

from stepwise.models.attention import batch_major, sdpa
from stepwise.models.rope_positions import cos_sin, gather_rotary, lean_unfused_rope, rotary_at_positions


def _gqa_case():
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 9, 8, generator=generator, requires_grad=True)
    k, v = (torch.randn(2, 2, 9, 8, generator=generator, requires_grad=True) for _ in range(2))
    return q, k, v, torch.randn(2, 4, 9, 8, generator=generator)


def _run(attend, q, k, v, grad_out):
    q.grad = k.grad = v.grad = None
    out = attend(q, k, v)
    out.backward(grad_out)
    return out.detach(), q.grad, k.grad, v.grad


def test_gqa_equals_attention_over_repeated_key_value_heads():
    q, k, v, grad_out = _gqa_case()
    mask = ~torch.ones(9, 9, dtype=torch.bool).tril()[None, None].expand(2, 1, 9, 9)
    for attention_mask in (None, mask):
        grouped = _run(lambda q, k, v: sdpa(q, k, v, attention_mask, 0.0, None), q, k, v, grad_out)
        repeated = _run(lambda q, k, v: sdpa(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                             attention_mask, 0.0, None), q, k, v, grad_out)
        assert torch.equal(grouped[0], repeated[0]) and torch.equal(grouped[1], repeated[1])
        for mine, reference in zip(grouped[2:], repeated[2:]):  # a key/value head's gradient sums its 2 query heads
            assert torch.allclose(mine, reference, rtol=1e-5, atol=1e-6)


def test_rows_with_the_same_positions_share_one_rotary_row():
    table = torch.randn(10, 1, 1, 6)
    same = torch.tensor([[0, 1, 2], [0, 1, 2]])
    assert rotary_at_positions(table, same).shape == (3, 1, 1, 6)
    assert torch.equal(rotary_at_positions(table, same).expand(3, 2, 1, 6), gather_rotary(table, same))
    packed = torch.tensor([[0, 1, 2], [0, 1, 0]])
    assert torch.equal(rotary_at_positions(table, packed), gather_rotary(table, packed))


def test_lean_rope_is_bitwise_megatrons():
    from megatron.core.models.common.embeddings import rope_utils

    lean_unfused_rope()
    lean_unfused_rope()  # idempotent: wraps megatron's once
    lean = rope_utils._apply_rotary_pos_emb_bshd
    reference = lean.megatron
    assert lean.is_lean and not getattr(reference, "is_lean", False)
    generator = torch.Generator().manual_seed(1)
    for freqs in (torch.randn(5, 1, 1, 8, generator=generator), torch.randn(5, 3, 1, 8, generator=generator)):
        for partial in (False, True):
            width = 12 if partial else 8
            fused = torch.randn(5, 3, 2, 2 * width, generator=generator)  # t is a strided split of it, as a query is
            grad_out = torch.randn(5, 3, 2, width, generator=generator)
            results = []
            for rope in (reference, lean):
                x = fused.clone().requires_grad_(True)
                out = rope(x[..., :width], freqs, rotary_interleaved=False, mscale=1.5)
                out.backward(grad_out)
                results.append((out.detach(), x.grad))
            assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
            if not partial:  # on CPU written [b, h, s, d]: the core attention's layout, taken without a copy
                assert results[1][0].permute(1, 2, 0, 3).is_contiguous()
                assert batch_major(results[1][0]).data_ptr() == results[1][0].data_ptr()


def test_cos_sin_are_computed_once_per_frequency_tensor():
    freqs = torch.randn(4, 1, 1, 6)
    first = cos_sin(freqs, 1.0, torch.float32)
    assert all(a is b for a, b in zip(first, cos_sin(freqs, 1.0, torch.float32)))
    assert torch.equal(first[0], torch.cos(freqs)) and torch.equal(first[1], torch.sin(freqs))
    other = cos_sin(freqs.clone(), 1.0, torch.float32)
    assert other[0] is not first[0] and torch.equal(other[0], first[0])

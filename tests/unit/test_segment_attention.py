"""Per-segment attention of packed rows equals the whole-row masked kernel, and other masks keep that kernel."""
import random

import pytest
import torch
import torch.nn.functional as F

from stepwise.models.segment_attention import Piece, row_pieces, segment_layout, segment_sdpa, sequence_bounds
from stepwise.train.prefix_packing import blocked_mask, collate_rows, pack_rows


def packed_mask(seed: int, rows: int = 3, length: int = 64) -> torch.Tensor:
    """[rows, 1, length, length] masks of rows packed from random (prefix, action) items: blocks whose
    prefix several actions share, single-segment blocks, and padding."""
    rng = random.Random(seed)
    items = []
    scale = max(1, length // 64)  # longer rows: longer prefixes and actions, as many of them
    for _ in range(12):
        prefix = [rng.randrange(3, 50) for _ in range(rng.randint(1, 9 * scale))]
        items += [(prefix, [rng.randrange(3, 50) for _ in range(rng.randint(1, 6 * scale))])
                  for _ in range(rng.randint(1, 3))]
    packed = pack_rows(items, budget=length - 3)
    return collate_rows(packed[:rows], length, pad_id=0)["attention_mask"]


def masked_reference(q, k, v, mask):
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=~mask)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_per_segment_attention_equals_the_masked_kernel_with_gradients(seed, kv_heads):
    mask = packed_mask(seed)
    layout = segment_layout(mask)
    assert layout is not None
    assert any(piece.shared_hi > piece.shared_lo for pieces in layout for piece in pieces)  # a shared prefix was read
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(mask.shape[0], 4, mask.shape[-1], 8, generator=generator, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(mask.shape[0], kv_heads, mask.shape[-1], 8, generator=generator, dtype=torch.float64,
                        requires_grad=True) for _ in range(2))
    weights = torch.randn(q.shape, generator=generator, dtype=torch.float64)
    got = segment_sdpa(q, k, v, layout, 0.0, None)
    grads = torch.autograd.grad((got * weights).sum(), (q, k, v))
    want = masked_reference(q, k, v, mask)
    want_grads = torch.autograd.grad((want * weights).sum(), (q, k, v))
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    for grad, want_grad in zip(grads, want_grads):
        assert torch.allclose(grad, want_grad, rtol=1e-12, atol=1e-12)


def test_pieces_of_a_shared_prefix_block():
    # block 0: shared [0, 3), segments [3, 5) and [5, 8); block 1 (padding): [8, 10)
    block_of = torch.tensor([0] * 8 + [1] * 2)
    segment = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 0, 0])
    position = torch.arange(10)
    visible = (position[None] <= position[:, None]) & (block_of[:, None] == block_of[None]) & (
        (segment[None] == 0) | (segment[:, None] == segment[None]))
    assert row_pieces(visible) == [Piece(0, 5, 0, 0, 0), Piece(5, 8, 0, 3, 5), Piece(8, 10, 8, 8, 8)]


def test_block_diagonal_rows_have_sequence_bounds_and_shared_prefix_rows_none():
    """THD's cu_seqlens: each sample (and the padding, a block of its own) one sequence, rows end to end."""
    blocks = torch.tensor([[0] * 4 + [1] * 3 + [2] * 2, [0] * 6 + [1] * 3])
    samples = blocked_mask(blocks, torch.zeros_like(blocks))
    assert sequence_bounds(segment_layout(samples), rows=2, seq=9) == [0, 4, 7, 9, 15, 18]
    one_row = segment_layout(samples[:1])  # one mask row broadcast over a batch of two
    assert sequence_bounds(one_row, rows=2, seq=9) == [0, 4, 7, 9, 13, 16, 18]
    # a prefix with one action is one causal run; a second action reading the prefix is not THD
    prefix_one_action = blocked_mask(torch.tensor([0] * 5 + [1] * 2), torch.tensor([0, 0, 0, 1, 1, 0, 0]))
    assert sequence_bounds(segment_layout(prefix_one_action), rows=1, seq=7) == [0, 5, 7]
    shared = blocked_mask(torch.tensor([0] * 8 + [1] * 2), torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 0, 0]))
    assert sequence_bounds(segment_layout(shared), rows=1, seq=10) is None


def test_a_mask_of_another_shape_keeps_the_masked_kernel():
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    assert row_pieces(causal) == [Piece(0, 6, 0, 0, 0)]
    one_gap = causal.clone()
    one_gap[5, 2] = False  # keys [0, 2) and [3, 5], but query 4's run starts at 0: read conservatively
    assert row_pieces(one_gap) is None
    strided = causal.clone()
    strided[5, 1] = strided[5, 3] = False  # keys {0, 2, 4, 5}: not one range plus a run
    assert row_pieces(strided) is None
    blind = causal.clone()
    blind[3, 3] = False  # a query that does not see itself
    assert row_pieces(blind) is None
    stacked = torch.stack([~causal, ~strided])[:, None]
    assert segment_layout(stacked) is None


def test_sdpa_reads_a_long_packed_mask_once_per_forward_and_a_short_one_never(monkeypatch):
    import stepwise.models.segment_attention as segment_attention
    from stepwise.models import attention

    calls = []
    monkeypatch.setattr(attention, "PACKED_LAYOUTS", segment_attention.LayoutCache())
    original = segment_attention.segment_layout
    monkeypatch.setattr(segment_attention, "segment_layout", lambda mask: calls.append(1) or original(mask))
    for length, reads in ((segment_attention.MIN_ROW_LENGTH, 1), (segment_attention.MIN_ROW_LENGTH - 8, 0)):
        calls.clear()
        mask = packed_mask(3, rows=2, length=length)
        q, k, v = (torch.randn(mask.shape[0], 2, mask.shape[-1], 4) for _ in range(3))
        for _ in range(3):  # three layers
            out = attention.sdpa(q, k, v, mask, 0.0, None)
        assert len(calls) == reads
        assert torch.allclose(out, masked_reference(q, k, v, mask), rtol=1e-5, atol=1e-6)

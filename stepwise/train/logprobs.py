"""Token log-probabilities from vocab-parallel logits, in chunks of positions, padded vocabulary masked.

The model's vocabulary is padded to a TP-friendly multiple; those columns must never take probability
mass, or training would differ from the exported HF model (which has only the real vocabulary).

`token_logprobs` is the form the trainer and the scorer use: the log-softmax of the label token is
computed a chunk of positions at a time (an fp32, padded-vocab-masked copy of one chunk only; the
backward pass recomputes each chunk's softmax from the saved per-position max and sum of
exponentials), and only at the positions a loss reads (`positions`, e.g. `loss_mask > 0`). So neither a
full fp32 [tokens x vocab] copy, nor a masked copy, nor softmax saved for backward ever exists; the
arithmetic per position is megatron's `vocab_parallel_cross_entropy`'s, in the same order.

`linear_token_logprobs` goes one step further, from hidden states and the output-layer weight shard:
the [tokens x vocab] logits never exist either, only one chunk of them (the weight gradient is summed
over chunks in fp32). `full_token_logprobs` is the straightforward form, kept as the reference.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

CHUNK_ELEMENTS = 1 << 24  # fp32 logits per chunk (64 MiB): 110 positions of a 152k vocabulary; small
# vocabularies take every position in one chunk (no per-chunk overhead where there is nothing to save)


def rows_per_chunk(vocab_shard: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab_shard)


def _tp_group_and_start(shard: int) -> tuple[object | None, int]:
    """This rank's TP group (None when TP = 1 or megatron is not initialised) and its first vocab column."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized() or parallel_state.get_tensor_model_parallel_world_size() == 1:
        return None, 0
    return parallel_state.get_tensor_model_parallel_group(), parallel_state.get_tensor_model_parallel_rank() * shard


def _all_reduce(tensor: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def _masked_fp32(fresh: torch.Tensor, start: int, real_vocab_size: int) -> torch.Tensor:
    """A chunk of logits [n, V/TP] (a fresh tensor: it may be changed in place) in fp32 with the columns
    >= real vocab set to -inf-ish."""
    chunk = fresh.float()
    padded_from = real_vocab_size - start
    if padded_from < chunk.shape[-1]:
        chunk[:, max(padded_from, 0):] = torch.finfo(torch.float32).min / 2
    return chunk


def _label_columns(labels: torch.Tensor, start: int, shard: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels as columns of this shard (0 where the label lives on another rank) and the in-shard flag."""
    local = labels - start
    inside = (local >= 0) & (local < shard)
    return torch.where(inside, local, 0), inside


def _chunk_forward(z: torch.Tensor, labels: torch.Tensor, start: int, group):
    """log p(label) of a masked fp32 chunk [n, V/TP] (shifted in place); returns (logp, max, sum_exp)."""
    top = _all_reduce(z.max(dim=-1).values, group, dist.ReduceOp.MAX)
    z -= top.unsqueeze(-1)
    columns, inside = _label_columns(labels, start, z.shape[-1])
    predicted = _all_reduce(torch.where(inside, z.gather(1, columns.unsqueeze(-1)).squeeze(-1), 0.0), group)
    sum_exp = _all_reduce(z.exp_().sum(dim=-1), group)
    return predicted - torch.log(sum_exp), top, sum_exp


def _chunk_grad(z: torch.Tensor, labels: torch.Tensor, start: int, top, sum_exp, grad_out) -> torch.Tensor:
    """d logp / d logits of a masked fp32 chunk times `grad_out`: (onehot - softmax) * grad_out, in place."""
    z -= top.unsqueeze(-1)
    softmax = z.exp_().div_(sum_exp.unsqueeze(-1))
    columns, inside = _label_columns(labels, start, z.shape[-1])
    softmax.scatter_add_(1, columns.unsqueeze(-1), -inside.to(softmax.dtype).unsqueeze(-1))
    return softmax.mul_(-grad_out.unsqueeze(-1))


class _ChunkedLogprobs(torch.autograd.Function):
    """log p(labels) at rows `rows` of vocab-parallel logits [N, V/TP], chunk by chunk (see module doc)."""

    @staticmethod
    def forward(ctx, logits, rows, labels, real_vocab_size, chunk):
        group, start = _tp_group_and_start(logits.shape[-1])
        out = torch.empty(rows.shape[0], dtype=torch.float32, device=logits.device)
        tops, sums = torch.empty_like(out), torch.empty_like(out)
        for begin in range(0, rows.shape[0], chunk):
            part = slice(begin, begin + chunk)
            z = _masked_fp32(logits.index_select(0, rows[part]), start, real_vocab_size)
            out[part], tops[part], sums[part] = _chunk_forward(z, labels[part], start, group)
        ctx.save_for_backward(logits, rows, labels, tops, sums)
        ctx.settings = (real_vocab_size, chunk, start)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, rows, labels, tops, sums = ctx.saved_tensors
        real_vocab_size, chunk, start = ctx.settings
        grad = torch.zeros_like(logits)
        for begin in range(0, rows.shape[0], chunk):
            part = slice(begin, begin + chunk)
            z = _masked_fp32(logits.index_select(0, rows[part]), start, real_vocab_size)
            grad.index_copy_(0, rows[part], _chunk_grad(z, labels[part], start, tops[part], sums[part],
                                                         grad_out[part]).to(grad.dtype))
        return grad, None, None, None, None


class _LinearChunkedLogprobs(torch.autograd.Function):
    """log p(labels) from hidden states [n, H] and the output weight shard [V/TP, H], chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, real_vocab_size, chunk):
        group, start = _tp_group_and_start(weight.shape[0])
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        tops, sums = torch.empty_like(out), torch.empty_like(out)
        for begin in range(0, hidden.shape[0], chunk):
            part = slice(begin, begin + chunk)
            z = _masked_fp32(hidden[part] @ weight.t(), start, real_vocab_size)
            out[part], tops[part], sums[part] = _chunk_forward(z, labels[part], start, group)
        ctx.save_for_backward(hidden, weight, labels, tops, sums)
        ctx.settings = (real_vocab_size, chunk, start, group)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, labels, tops, sums = ctx.saved_tensors
        real_vocab_size, chunk, start, group = ctx.settings
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for begin in range(0, hidden.shape[0], chunk):
            part = slice(begin, begin + chunk)
            z = _masked_fp32(hidden[part] @ weight.t(), start, real_vocab_size)
            grad_logits = _chunk_grad(z, labels[part], start, tops[part], sums[part], grad_out[part]).to(weight.dtype)
            grad_hidden[part] = grad_logits @ weight
            grad_weight.addmm_(grad_logits.t().float(), hidden[part].float())
        return _all_reduce(grad_hidden, group), grad_weight.to(weight.dtype), None, None, None


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, real_vocab_size: int,
                   positions: torch.Tensor | None = None, chunk: int | None = None) -> torch.Tensor:
    """log p(labels) [B, S] (fp32) from vocab-parallel logits [B, S, V/TP]; only where `positions` [B, S]
    is true (0.0 elsewhere) when given, else everywhere."""
    flat = logits.reshape(-1, logits.shape[-1])
    if positions is None:
        rows = torch.arange(flat.shape[0], device=logits.device)
    else:
        rows = positions.reshape(-1).nonzero().squeeze(-1)
    chunk = chunk or rows_per_chunk(flat.shape[-1])
    picked = _ChunkedLogprobs.apply(flat, rows, labels.reshape(-1)[rows], real_vocab_size, chunk)
    out = torch.zeros(flat.shape[0], dtype=torch.float32, device=logits.device).index_put((rows,), picked)
    return out.view(labels.shape)


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, real_vocab_size: int,
                          chunk: int | None = None) -> torch.Tensor:
    """log p(labels) [n] (fp32) from hidden states [n, H] (the positions a loss reads) and this rank's
    output-layer weight shard [V/TP, H]; the input gradient is all-reduced over TP (no sequence parallel)."""
    return _LinearChunkedLogprobs.apply(hidden, weight, labels, real_vocab_size, chunk or rows_per_chunk(weight.shape[0]))


def mask_padded_vocab(logits: torch.Tensor, real_vocab_size: int) -> torch.Tensor:
    """Copy of `logits` ([..., V/TP], this TP rank's shard) with entries >= real vocab set to -inf-ish."""
    shard = logits.shape[-1]
    _, start = _tp_group_and_start(shard)
    if start + shard <= real_vocab_size:
        return logits.clone()
    columns = torch.arange(start, start + shard, device=logits.device)
    return logits.masked_fill(columns >= real_vocab_size, torch.finfo(logits.dtype).min / 2)


def full_token_logprobs(logits: torch.Tensor, labels: torch.Tensor, real_vocab_size: int) -> torch.Tensor:
    """The straightforward form (reference for tests and benchmarks): the whole fp32 copy of the logits,
    a masked copy of it, megatron's vocab-parallel cross-entropy."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    masked = mask_padded_vocab(logits.float(), real_vocab_size)
    return -vocab_parallel_cross_entropy(masked, labels)

"""Token log-probabilities from vocab-parallel logits or from hidden states, in chunks of positions,
padded vocabulary masked.

The model's vocabulary is padded to a TP-friendly multiple; those columns must never take probability
mass, or training would differ from the exported HF model (which has only the real vocabulary).

`token_logprobs` is the form for a model that returns whole logits: the log-softmax of the label token is
computed a chunk of positions at a time (an fp32, padded-vocab-masked copy of one chunk only; the
backward pass recomputes each chunk's softmax from the saved per-position max and sum of
exponentials), and only at the positions a loss reads (`positions`, e.g. `loss_mask > 0`). So neither a
full fp32 [tokens x vocab] copy, nor a masked copy, nor softmax saved for backward ever exists; the
arithmetic per position is megatron's `vocab_parallel_cross_entropy`'s, in the same order.

`linear_token_logprobs` goes one step further, from hidden states and the output-layer weight shard:
the [tokens x vocab] logits never exist either, only one chunk of them. The weight gradient is summed
over chunks in fp32: straight into megatron DDP's fp32 `main_grad` buffer when the weight has one
(`stepwise.parallel.wgrad`), else into an fp32 accumulator returned as the gradient.
`hidden_token_logprobs` is its [B, S] form at the positions a loss reads, and `model_token_logprobs`
picks the form a model's output calls for (`stepwise.models.hidden_output`: the training and scoring
policy models hand back hidden states). `full_token_logprobs` is the straightforward form, kept as the
reference.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from stepwise.parallel.wgrad import accumulate, dummy_gradient

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
    top = _all_reduce(z.amax(dim=-1), group, dist.ReduceOp.MAX)  # amax: no argmax to compute
    z -= top.unsqueeze(-1)
    columns, inside = _label_columns(labels, start, z.shape[-1])
    predicted = _all_reduce(torch.where(inside, z.gather(1, columns.unsqueeze(-1)).squeeze(-1), 0.0), group)
    sum_exp = _all_reduce(z.exp_().sum(dim=-1), group)
    return predicted - torch.log(sum_exp), top, sum_exp


def _chunk_grad(z: torch.Tensor, labels: torch.Tensor, start: int, top, sum_exp, grad_out) -> torch.Tensor:
    """d logp / d logits of a masked fp32 chunk times `grad_out`: (onehot - softmax) * grad_out, in place."""
    z -= top.unsqueeze(-1)
    return _grad_from_exp(z.exp_(), labels, start, sum_exp, grad_out)


def _grad_from_exp(exp_z: torch.Tensor, labels: torch.Tensor, start: int, sum_exp, grad_out) -> torch.Tensor:
    """`_chunk_grad` from the chunk as `_chunk_forward` leaves it, exp(z - max), in place."""
    softmax = exp_z.div_(sum_exp.unsqueeze(-1))
    columns, inside = _label_columns(labels, start, exp_z.shape[-1])
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
    """log p(labels) from hidden states [n, H] and the output weight shard [V/TP, H], chunk by chunk.
    When all positions fit one chunk, that chunk (as `_chunk_forward` leaves it) is kept for backward
    instead of recomputed: at most one chunk (CHUNK_ELEMENTS fp32) lives from forward to backward, and
    the gradient is bitwise the recomputing one's (the same arithmetic)."""

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
        ctx.kept_exp = z if 0 < hidden.shape[0] <= chunk else None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, labels, tops, sums = ctx.saved_tensors
        real_vocab_size, chunk, start, group = ctx.settings
        grad_hidden = torch.empty_like(hidden)
        main_grad = getattr(weight, "main_grad", None)
        accumulator = main_grad if main_grad is not None else torch.zeros(weight.shape, dtype=torch.float32,
                                                                         device=weight.device)
        for begin in range(0, hidden.shape[0], chunk):
            part = slice(begin, begin + chunk)
            if ctx.kept_exp is not None:
                grad_logits = _grad_from_exp(ctx.kept_exp, labels[part], start, sums[part], grad_out[part])
                ctx.kept_exp = None
            else:
                z = _masked_fp32(hidden[part] @ weight.t(), start, real_vocab_size)
                grad_logits = _chunk_grad(z, labels[part], start, tops[part], sums[part], grad_out[part])
            grad_logits = grad_logits.to(weight.dtype)
            grad_hidden[part] = grad_logits @ weight
            accumulate(hidden[part], grad_logits, accumulator)
        grad_weight = accumulator.to(weight.dtype) if main_grad is None else dummy_gradient(weight, hidden.dtype)
        return _all_reduce(grad_hidden, group), grad_weight, None, None, None


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, real_vocab_size: int,
                   positions: torch.Tensor | None = None, chunk: int | None = None) -> torch.Tensor:
    """log p(labels) [B, S] (fp32) from vocab-parallel logits [B, S, V/TP]; only where `positions` [B, S]
    is true (0.0 elsewhere) when given, else everywhere."""
    flat = logits.reshape(-1, logits.shape[-1])
    rows = read_rows(labels, positions)
    chunk = chunk or rows_per_chunk(flat.shape[-1])
    picked = _ChunkedLogprobs.apply(flat, rows, labels.reshape(-1)[rows], real_vocab_size, chunk)
    return _scatter_rows(picked, rows, labels)


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, real_vocab_size: int,
                          chunk: int | None = None) -> torch.Tensor:
    """log p(labels) [n] (fp32) from hidden states [n, H] (the positions a loss reads) and this rank's
    output-layer weight shard [V/TP, H]; the input gradient is all-reduced over TP (so under sequence
    parallelism the hidden states come gathered, and their gradient is this rank's slice of it)."""
    return _LinearChunkedLogprobs.apply(hidden, weight, labels, real_vocab_size, chunk or rows_per_chunk(weight.shape[0]))


def read_rows(labels: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """Flat indices of the [B, S] positions to compute (all when `positions` is None). A packed
    micro-batch's mask holds one row per segment: a position is read when any segment reads it
    (`prefix_packing.read_positions`)."""
    from stepwise.train.prefix_packing import read_positions

    if positions is None:
        return torch.arange(labels.numel(), device=labels.device)
    return read_positions(positions, labels).reshape(-1).nonzero().squeeze(-1)


def _scatter_rows(picked: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(labels.numel(), dtype=torch.float32, device=labels.device).index_put((rows,), picked)
    return out.view(labels.shape)


def hidden_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, real_vocab_size: int,
                          positions: torch.Tensor | None = None, chunk: int | None = None) -> torch.Tensor:
    """log p(labels) [B, S] (fp32) from final hidden states [B, S, H] (whole sequences, every TP rank's
    copy) and this rank's output weight shard [V/TP, H]; the rows are gathered at `positions` (as
    `read_rows`) before the output layer, so logits exist for one chunk of those rows only; 0.0 elsewhere.
    Where every position is read (SFT rows without a prompt), the hidden states go in as they are."""
    rows = read_rows(labels, positions)
    flat = hidden.reshape(-1, hidden.shape[-1])
    if rows.numel() == labels.numel():  # every position is read: no gather, no scatter
        return linear_token_logprobs(flat, weight, labels.reshape(-1), real_vocab_size, chunk).view(labels.shape)
    picked = linear_token_logprobs(flat.index_select(0, rows), weight, labels.reshape(-1)[rows], real_vocab_size, chunk)
    return _scatter_rows(picked, rows, labels)


def model_token_logprobs(model, output: torch.Tensor, labels: torch.Tensor, real_vocab_size: int,
                         positions: torch.Tensor | None = None) -> torch.Tensor:
    """log p(labels) [B, S] from a policy model's last-stage `output`: hidden states when the model hands
    them back (`stepwise.models.hidden_output`), else vocab-parallel logits."""
    from stepwise.models.hidden_output import output_weight, returns_hidden_states

    if returns_hidden_states(model):
        return hidden_token_logprobs(output, output_weight(model), labels, real_vocab_size, positions)
    return token_logprobs(output, labels, real_vocab_size, positions)


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

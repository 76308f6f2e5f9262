"""Token log-probabilities from vocab-parallel logits, with the padded vocabulary rows masked.

The model's vocabulary is padded to a TP-friendly multiple; those rows must never take probability
mass, or training would differ from the exported HF model (which has only the real vocabulary).
"""
from __future__ import annotations

import torch


def mask_padded_vocab(logits: torch.Tensor, real_vocab_size: int) -> torch.Tensor:
    """Copy of `logits` ([..., V/TP], this TP rank's shard) with entries >= real vocab set to -inf-ish."""
    from megatron.core import parallel_state

    shard = logits.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * shard
    if start + shard <= real_vocab_size:
        return logits.clone()
    columns = torch.arange(start, start + shard, device=logits.device)
    return logits.masked_fill(columns >= real_vocab_size, torch.finfo(logits.dtype).min / 2)


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, real_vocab_size: int) -> torch.Tensor:
    """log p(labels) of shape [B, S] from vocab-parallel logits [B, S, V/TP] (fp32 math)."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    masked = mask_padded_vocab(logits.float(), real_vocab_size)
    return -vocab_parallel_cross_entropy(masked, labels)

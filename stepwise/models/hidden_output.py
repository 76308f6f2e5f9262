"""Policy models whose last pipeline stage hands back final hidden states instead of vocabulary logits.

Training and scoring read log-probs at a few positions only (`stepwise.train.logprobs.
hidden_token_logprobs`: rows gathered where the loss reads, then one chunk of logits at a time from the
output weight shard), so the whole [B, S, V/TP] logits never need to exist. `hand_back_hidden_states`
makes the output layer (megatron's ColumnParallelLinear; the same module under the local and the
Transformer Engine specs) return its input instead of the projection; its weight stays where it was,
so checkpoints, tied-weight sync and conversion are unchanged. GPTModel then returns [B, S, H].

Under sequence parallelism the hidden states arrive split along the sequence: they are all-gathered
(every TP rank then holds whole sequences, as the vocab-parallel logits need), and the backward keeps
this rank's slice of the gradient, which the log-prob op has already all-reduced over TP: together
exactly the reduce-scatter of ColumnParallelLinear's sequence-parallel input. (Sequence parallelism
runs on GPU only; it could not be run here.)

GPTModel hands its output back batch-major (`transpose(0, 1).contiguous()`), so autograd would send
the gradient back as a transposed view: every residual add, norm and linear of the backward pass then
works on (and megatron's linears copy) a non-contiguous [S, B, H] gradient. The hidden states are
therefore laid out batch-major here (`_BatchMajorLayout`: GPTModel's transpose is then free) and
their gradient is made contiguous sequence-major once, where it enters the decoder.

Only the models built for training and scoring take this path; conversion, HF parity and export build
plain GPTModels and get whole logits.
"""
from __future__ import annotations

import types

import torch

HIDDEN_OUTPUT_FLAG = "hands_back_hidden_states"


class _BatchMajorLayout(torch.autograd.Function):
    """[S, B, H] in, the same values out laid out as [B, S, H] in memory; the gradient back contiguous."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.transpose(0, 1).contiguous().transpose(0, 1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def _hidden_forward(self, input_: torch.Tensor, weight=None, runtime_gather_output=None):
    """ColumnParallelLinear.forward's signature and (output, bias) result, without the projection."""
    if self.sequence_parallel:  # [S/TP, B, H] -> [S, B, H]; the gradient keeps this rank's slice
        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

        input_ = gather_from_sequence_parallel_region(input_, tensor_parallel_output_grad=False)
    return _BatchMajorLayout.apply(input_), None


def hand_back_hidden_states(model) -> None:
    """Make `model` (a GPTModel) return final hidden states [B, S, H] from its last stage."""
    setattr(model, HIDDEN_OUTPUT_FLAG, True)
    if model.post_process:
        model.output_layer.forward = types.MethodType(_hidden_forward, model.output_layer)


def returns_hidden_states(model) -> bool:
    from megatron.core.utils import unwrap_model

    return getattr(unwrap_model(model), HIDDEN_OUTPUT_FLAG, False)


def output_weight(model) -> torch.Tensor:
    """The output-layer weight shard [V/TP, H] of the last stage: the embedding weight when tied at PP 1,
    the last stage's synchronised copy when tied at PP > 1 (megatron's
    `shared_embedding_or_output_weight()`), else the output layer's own."""
    from megatron.core.utils import unwrap_model

    inner = unwrap_model(model)  # the GPTModel inside DDP / Float16Module
    if inner.share_embeddings_and_output_weights:
        return inner.shared_embedding_or_output_weight()
    return inner.output_layer.weight

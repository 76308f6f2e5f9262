"""The critic / value model: a GPTModel trunk whose output layer is a scalar head.

`build_critic_model` returns a GPTModel whose forward gives head logits of shape [B, S, 1];
V(s) = sigmoid(head(hidden at the last token of s)). The head is replicated across TP ranks: it reads
the full final hidden states (gathered along the sequence first when sequence parallelism splits
them) and every TP rank computes the same values and the same head gradient. A critic
is initialised from a causal-LM checkpoint (trunk loaded, head freshly initialised) or from a
critic checkpoint; it exports as HF `*ForTokenClassification` with `num_labels=1` (`score` head).
"""
from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule

from stepwise.models.builder import EngineOptions, build_gpt_model
from stepwise.models.hf_config import ModelArch

HEAD_PREFIX = "output_layer."


class ValueHead(MegatronModule):
    """hidden [S, B, H] -> ([S, B, 1], None), standing in for the vocabulary projection."""

    def __init__(self, config, hidden_size: int, init_std: float):
        super().__init__(config=config)
        self.weight = torch.nn.Parameter(torch.empty(1, hidden_size, dtype=config.params_dtype))
        self.bias = torch.nn.Parameter(torch.zeros(1, dtype=config.params_dtype))
        with torch.no_grad():
            self.weight.normal_(0.0, init_std)

    def forward(self, hidden: torch.Tensor, weight=None, runtime_gather_output=None):
        if self.config.sequence_parallel:  # [S/TP, B, H] -> [S, B, H]; backward keeps this rank's slice
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        return torch.nn.functional.linear(hidden, self.weight, self.bias), None


def build_critic_model(arch: ModelArch, options: EngineOptions, max_seq_len: int | None = None):
    """A GPTModel trunk (untied output) with a `ValueHead` on the last pipeline stage."""
    from dataclasses import replace

    model = build_gpt_model(replace(arch, tie_word_embeddings=False), options, max_seq_len)
    if model.post_process:
        device = next(model.parameters()).device
        model.output_layer = ValueHead(model.config, arch.hidden_size, arch.initializer_range).to(device)
    return model


def is_head_key(key: str) -> bool:
    return key.startswith(HEAD_PREFIX)

"""The `policy_value` model for DQO / DRO: one GPTModel whose last stage gives, per token, the policy's
vocabulary logits and a scalar value V(s_h) read from the same final hidden state (a value head on
the policy trunk; the paper's separate value network is the `critic` builder trained alongside).

The value head (`value_head.*`, a `critic.ValueHead`) hangs off the model and is applied by a forward
hook on the output layer, so the policy's parameter names stay those of a plain GPTModel: a policy
checkpoint loads into it (head freshly initialised) and its policy part exports to HF unchanged. The
hook appends the value as one extra column to each TP rank's vocabulary shard of the logits;
`split_policy_value` takes it back off.
"""
from __future__ import annotations

import torch

from stepwise.models.builder import EngineOptions, build_gpt_model
from stepwise.models.critic import ValueHead
from stepwise.models.hf_config import ModelArch

VALUE_HEAD_PREFIX = "value_head."


def build_policy_value_model(arch: ModelArch, options: EngineOptions, max_seq_len: int | None = None):
    """A GPTModel (tied or untied as `arch` says) with a `ValueHead` on its last pipeline stage."""
    model = build_gpt_model(arch, options, max_seq_len)
    if model.post_process:
        device = next(model.parameters()).device
        model.value_head = ValueHead(model.config, arch.hidden_size, arch.initializer_range).to(device)

        def append_value(module, args, output):
            logits, bias = output
            value, _ = model.value_head(args[0])
            return torch.cat([logits, value.to(logits.dtype)], dim=-1), bias

        model.output_layer.register_forward_hook(append_value)
    return model


def split_policy_value(output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, S, V/TP + 1] -> (vocabulary logits [B, S, V/TP], values [B, S])."""
    return output[..., :-1], output[..., -1]


def is_value_head_key(key: str) -> bool:
    return key.startswith(VALUE_HEAD_PREFIX)

"""The `policy_value` models of DQO / DRO: per token, the policy's vocabulary logits (or, built with
`hidden_output` as training does, its final hidden states) and a scalar value V(s_h), in one output
(the value as one extra column of the policy output; `split_policy_value` takes it back off). Two structures, `dqo_data.value_model`:

- `separate` (the paper's): `PolicyWithValueNetwork`, the policy GPTModel carrying a second network
  V_phi (a `critic` model: its own trunk, possibly another checkpoint of the same vocabulary) as the
  submodule `value_network`. Both run at the same TP/PP layout, stage by stage: between pipeline stages
  the two hidden states travel as one tensor concatenated along the hidden axis (`pipeline_config`
  gives the schedule that width). Policy checkpoint keys are unchanged; the value network's carry the
  prefix `value_network.`, so the policy exports to HF as it is and a policy checkpoint loads into it.
- `head`: a `critic.ValueHead` on the policy's own final hidden state (`value_head.*`), applied by a
  forward hook on the output layer: one model's memory, values and policy share the trunk.
"""
from __future__ import annotations

import copy

import torch
from megatron.core.models.gpt.gpt_model import GPTModel

from stepwise.models.builder import EngineOptions, build_gpt_model
from stepwise.models.critic import ValueHead, build_critic_model
from stepwise.models.hf_config import ModelArch

VALUE_HEAD_PREFIX = "value_head."
VALUE_NETWORK_PREFIX = "value_network."
VALUE_PREFIXES = (VALUE_HEAD_PREFIX, VALUE_NETWORK_PREFIX)


def build_policy_value_model(arch: ModelArch, options: EngineOptions, max_seq_len: int | None = None,
                             hidden_output: bool = False):
    """A GPTModel (tied or untied as `arch` says) with a `ValueHead` on its last pipeline stage."""
    model = build_gpt_model(arch, options, max_seq_len, hidden_output=hidden_output)
    if model.post_process:
        device = next(model.parameters()).device
        model.value_head = ValueHead(model.config, arch.hidden_size, arch.initializer_range).to(device)

        def append_value(module, args, output):
            logits, bias = output
            value, _ = model.value_head(args[0])
            return torch.cat([logits, value.to(logits.dtype)], dim=-1), bias

        model.output_layer.register_forward_hook(append_value)
    return model


class PolicyWithValueNetwork(GPTModel):
    """The policy GPTModel plus `value_network` (set by `build_policy_with_value_network`), run side by
    side on every pipeline stage."""

    value_network: GPTModel
    pipeline_config: object  # the policy's TransformerConfig with hidden_size = policy + value widths

    def set_input_tensor(self, input_tensor) -> None:
        tensor = input_tensor[0] if isinstance(input_tensor, list) else input_tensor
        if tensor is None:
            super().set_input_tensor(None)
            self.value_network.set_input_tensor(None)
            return
        width = self.config.hidden_size
        super().set_input_tensor(tensor[..., :width])
        self.value_network.set_input_tensor(tensor[..., width:])

    def forward(self, input_ids, position_ids, attention_mask, *args, **kwargs):
        policy = super().forward(input_ids, position_ids, attention_mask, *args, **kwargs)
        value = self.value_network(input_ids, position_ids, attention_mask)
        return torch.cat([policy, value.to(policy.dtype)], dim=-1)


def build_policy_with_value_network(arch: ModelArch, value_arch: ModelArch, options: EngineOptions,
                                    max_seq_len: int | None = None, hidden_output: bool = False) -> PolicyWithValueNetwork:
    """The policy of `arch` and a value network of `value_arch` (same vocabulary) at one layout."""
    if value_arch.vocab_size != arch.vocab_size:
        raise ValueError(f"the value network's vocabulary ({value_arch.vocab_size}) differs from the policy's "
                         f"({arch.vocab_size}): it must read the policy's tokens")
    model = build_gpt_model(arch, options, max_seq_len, model_class=PolicyWithValueNetwork, hidden_output=hidden_output)
    model.value_network = build_critic_model(value_arch, options, max_seq_len)
    model.pipeline_config = copy.copy(model.config)
    model.pipeline_config.hidden_size = arch.hidden_size + value_arch.hidden_size
    return model


def split_policy_value(output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, S, W + 1] -> (the policy's output [B, S, W], values [B, S]); W is V/TP (logits) or, for models
    that hand back hidden states (`stepwise.models.hidden_output`), the hidden size."""
    return output[..., :-1], output[..., -1]


def is_value_key(key: str) -> bool:
    """A parameter of the value part (head or network), absent from a policy checkpoint."""
    return key.startswith(VALUE_PREFIXES)

"""The loss-plugin registry and protocol.

A plugin has a name, an options dataclass (strictly parsed from `train.loss_args`) and
`compute(options, batch, outputs) -> (loss, metrics)`, where outputs are token log-probs [B, S] for
policy losses, value-head logits [B, S] for critic losses, and `{"logprobs": [B, S], "values": [B, S]}`
for policy-value losses (`dqo`, `dro`). `batch` is one micro-batch of tensors; it
carries `normalizer`, the count (tokens, sequences, actions...) over the *whole global batch*, so the
loss is a sum divided by a global constant: splitting a global batch into micro-batches x
accumulation x DP ranks yields the same gradient (gradients are summed, never averaged).
`metrics` values are sums over the micro-batch (the trainer all-reduces and divides them).
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any, Callable

import torch

from stepwise.registry import Registry

Metrics = dict[str, torch.Tensor]


@dataclass(frozen=True)
class LossPlugin:
    name: str
    options: type
    compute: Callable[[Any, dict[str, torch.Tensor], Any], tuple[torch.Tensor, Metrics]]  # outputs: see above
    normalizer: str  # what `batch["normalizer"]` counts: "tokens", "sequences", "actions", "states", "pairs"
    data_kind: str  # which batch builder feeds it, e.g. "sft"
    model_kind: str = "policy"  # "policy": token log-probs; "critic": value-head logits;
    # "policy_value": {"logprobs", "values"} from one model with both outputs

    def parse_options(self, args: dict[str, Any] | None):
        """Build the options dataclass; unknown keys raise naming the closest valid one."""
        args = dict(args or {})
        valid = [f.name for f in dataclasses.fields(self.options)]
        for key in args:
            if key not in valid:
                close = difflib.get_close_matches(key, valid, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else f" (valid: {valid})"
                raise ValueError(f"loss '{self.name}' has no option '{key}'{hint}")
        return self.options(**args)


PLUGINS: Registry[LossPlugin] = Registry("loss")
get = PLUGINS.get
names = PLUGINS.names


def register(name: str, options: type, normalizer: str, data_kind: str, model_kind: str = "policy"):
    """Decorator: register `compute` under `name`; a duplicate name is an error."""

    def decorate(compute):
        PLUGINS.add(name, LossPlugin(name, options, compute, normalizer, data_kind, model_kind))
        return compute

    return decorate

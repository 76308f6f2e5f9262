"""`critic_bce`: binary cross-entropy between Monte-Carlo state values and the critic (paper §3.2).

The critic's head gives a logit per token; V(s) = sigmoid(logit at the last token of s). Every state
of one solution is read from one forward pass: `value_mask` marks the last token of each state and
`value_target` holds its MC value in [0, 1] (a soft target). Averaged over the states of the global
batch (`normalizer` = their count).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stepwise.losses.registry import Metrics, register


@dataclass(frozen=True)
class CriticBCEOptions:
    pass


def critic_bce_sum(value_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum over states of BCE(target, sigmoid(logit)); 1-D tensors over states."""
    return F.binary_cross_entropy_with_logits(value_logits.float(), targets.float(), reduction="sum")


@register("critic_bce", CriticBCEOptions, normalizer="states", data_kind="values", model_kind="critic")
def compute(options: CriticBCEOptions, batch: dict[str, torch.Tensor], head: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
    mask = batch["value_mask"].bool()
    logits, targets = head[mask], batch["value_target"][mask]
    loss = critic_bce_sum(logits, targets) / batch["normalizer"]
    values = torch.sigmoid(logits.detach().float())
    return loss, {"states": mask.sum().float(), "bce_sum": critic_bce_sum(logits.detach(), targets),
                  "abs_error_sum": (values - targets).abs().sum()}

"""`skywork_dapo`: Skywork's Direct Advantage Policy Optimization policy loss (paper eq. 3.6).

Per (state s, action a) with a critic advantage Â and the reference log-probability stored at the
advantage stage:  ½ · (Â/β − (log π_θ(a|s) − log π_ref(a|s)))², where log π(a|s) sums the action's
token log-probs. Averaged over the actions of the global batch (`normalizer` = their count).
Not ByteDance's DAPO (decoupled clip); the name is always `skywork_dapo`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from stepwise.losses.registry import Metrics, register


@dataclass(frozen=True)
class SkyworkDAPOOptions:
    beta: float = 0.01  # paper default

    def __post_init__(self):
        if self.beta <= 0:
            raise ValueError(f"skywork_dapo.beta must be > 0, got {self.beta}")


def skywork_dapo_loss(logp: torch.Tensor, ref_logp: torch.Tensor, advantage: torch.Tensor, beta: float) -> torch.Tensor:
    """Mean over actions of ½(Â/β − log π/π_ref)²; every argument is a 1-D tensor over actions."""
    return skywork_dapo_sum(logp, ref_logp, advantage, beta) / logp.numel()


def skywork_dapo_sum(logp: torch.Tensor, ref_logp: torch.Tensor, advantage: torch.Tensor, beta: float) -> torch.Tensor:
    residual = advantage / beta - (logp - ref_logp)
    return 0.5 * (residual**2).sum()


@register("skywork_dapo", SkyworkDAPOOptions, normalizer="actions", data_kind="action")
def compute(options: SkyworkDAPOOptions, batch: dict[str, torch.Tensor], logprobs: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
    mask = batch["loss_mask"].to(logprobs.dtype)
    logp = (logprobs * mask).sum(dim=1)
    ref_logp = batch["ref_logp"].to(logp.dtype)
    advantage = batch["advantage"].to(logp.dtype)
    loss = skywork_dapo_sum(logp, ref_logp, advantage, options.beta) / batch["normalizer"]
    log_ratio = (logp - ref_logp).detach()
    return loss, {"actions": torch.tensor(float(logp.numel())), "log_ratio_sum": log_ratio.sum(),
                  "positive_log_ratio_sum": (log_ratio * (advantage > 0)).sum()}

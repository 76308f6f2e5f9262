"""`dpo`: Direct Preference Optimization (Rafailov et al. 2023), the sigmoid loss on (chosen, rejected) pairs.

Per pair, with log π(y|x) summed over the response tokens (and eos) and the reference log-probs
stored per sequence when the pairs were built:

    Δ = β [(log π_θ(y_w|x) − log π_ref(y_w|x)) − (log π_θ(y_l|x) − log π_ref(y_l|x))],   loss = −log σ(Δ)

A `pair` batch holds each pair as two adjacent rows (chosen at even rows, rejected at the next odd
row) of one micro-batch. Summed over pairs and divided by `normalizer` = pairs in the global batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stepwise.losses.registry import Metrics, register


@dataclass(frozen=True)
class DPOOptions:
    beta: float = 0.1  # the DPO baseline's β in the DQO paper (appendix B)

    def __post_init__(self):
        if not self.beta > 0:
            raise ValueError(f"dpo.beta must be > 0, got {self.beta}")


def sequence_logp(logprobs: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """[B, S] token log-probs -> [B]: the sum over each row's loss tokens."""
    return torch.where(loss_mask > 0, logprobs, 0.0).sum(dim=1)


def dpo_sum(chosen_logp: torch.Tensor, rejected_logp: torch.Tensor, ref_chosen_logp: torch.Tensor,
            ref_rejected_logp: torch.Tensor, beta: float) -> tuple[torch.Tensor, Metrics]:
    """Σ over pairs of −log σ(Δ) and metric sums; every argument is a 1-D tensor over pairs."""
    chosen_reward = beta * (chosen_logp - ref_chosen_logp)
    rejected_reward = beta * (rejected_logp - ref_rejected_logp)
    margin = chosen_reward - rejected_reward
    loss = -F.logsigmoid(margin).sum()
    margin = margin.detach()
    return loss, {"pairs": margin.new_tensor(float(margin.numel())), "margin_sum": margin.sum(),
                  "accuracy_sum": (margin > 0).sum().to(margin.dtype),
                  "chosen_reward_sum": chosen_reward.detach().sum(), "rejected_reward_sum": rejected_reward.detach().sum()}


def dpo_loss(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp, beta: float) -> torch.Tensor:
    """Mean over pairs of −log σ(Δ)."""
    return dpo_sum(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp, beta)[0] / chosen_logp.numel()


@register("dpo", DPOOptions, normalizer="pairs", data_kind="pair")
def compute(options: DPOOptions, batch: dict[str, torch.Tensor], logprobs: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
    rows = batch["loss_mask"].shape[0]  # a packed row's loss_mask has one row per sequence
    if rows % 2:
        raise ValueError(f"dpo: a micro-batch of {rows} rows splits a (chosen, rejected) pair (data kind 'pair')")
    if "chosen" in batch and not (bool(batch["chosen"][0::2].all()) and not bool(batch["chosen"][1::2].any())):
        raise ValueError("dpo: batch key 'chosen' must mark even rows chosen and odd rows rejected")
    logp = sequence_logp(logprobs, batch["loss_mask"])
    ref = batch["ref_logp"].to(logp.dtype)
    total, metrics = dpo_sum(logp[0::2], logp[1::2], ref[0::2], ref[1::2], options.beta)
    return total / batch["normalizer"], metrics

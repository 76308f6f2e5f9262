"""`sft`: token-level negative log-likelihood on the response tokens (also the `rs` baseline's loss).

Normalised by the number of loss tokens in the global batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from stepwise.losses.registry import Metrics, register


@dataclass(frozen=True)
class SFTOptions:
    pass


def sft_loss(logprobs: torch.Tensor, loss_mask: torch.Tensor, normalizer: torch.Tensor | float) -> torch.Tensor:
    """-sum(mask * logprobs) / normalizer; `logprobs` and `loss_mask` are [B, S]."""
    return -(logprobs * loss_mask).sum() / normalizer


@register("sft", SFTOptions, normalizer="tokens", data_kind="sft")
def compute(options: SFTOptions, batch: dict[str, torch.Tensor], logprobs: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
    mask = batch["loss_mask"].to(logprobs.dtype)
    loss = sft_loss(logprobs, mask, batch["normalizer"])
    nll_sum = -(logprobs.detach() * mask).sum()
    return loss, {"nll_sum": nll_sum, "target_tokens": mask.sum()}

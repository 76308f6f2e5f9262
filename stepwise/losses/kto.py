"""`kto`: Kahneman-Tversky Optimization (Ethayarajh et al. 2024) on responses labelled desirable or not.

Per response y to prompt x, with r = log π_θ(y|x) − log π_ref(y|x) (summed over the response tokens
and eos; the reference log-prob is stored per sequence):

    desirable:    λ_D − λ_D σ(β (r − z_ref))
    undesirable:  λ_U − λ_U σ(β (z_ref − r))

Reference point z_ref (our estimate, documented because the paper's differs): for a row in KL group
g, z_ref = max(0, mean over the rows of group g of the *detached* r), where group g is the rows
[g·k, (g+1)·k) of the global batch, k = `kl_group_size`. No gradient flows through z_ref. The paper
instead averages log π_θ/π_ref over mismatched pairs (x_i, y_j) of a micro-batch, which costs a
second forward pass; this matched-pair mean needs none. Groups are fixed positions of the global
batch, not micro-batches, so the gradient is the same for any micro-batch x accumulation x DP split
whose micro-batches hold whole groups (micro_batch_size a multiple of kl_group_size; checked here).
The batch supplies `row`, each row's position in the global batch. Summed over responses and
divided by `normalizer` = responses in the global batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from stepwise.losses.dpo import sequence_logp
from stepwise.losses.registry import Metrics, register


@dataclass(frozen=True)
class KTOOptions:
    beta: float = 0.1  # the DQO paper reuses its DPO settings for KTO (appendix B)
    desirable_weight: float = 1.0  # λ_D
    undesirable_weight: float = 1.0  # λ_U
    kl_group_size: int = 8  # rows per z_ref estimate (the paper's baselines: 8 sequences per device)

    def __post_init__(self):
        if not self.beta > 0:
            raise ValueError(f"kto.beta must be > 0, got {self.beta}")
        for name in ("desirable_weight", "undesirable_weight"):
            if not getattr(self, name) > 0:
                raise ValueError(f"kto.{name} must be > 0, got {getattr(self, name)}")
        if isinstance(self.kl_group_size, bool) or not isinstance(self.kl_group_size, int) or self.kl_group_size < 1:
            raise ValueError(f"kto.kl_group_size must be an integer >= 1, got {self.kl_group_size!r}")


def kl_reference(log_ratio: torch.Tensor, row: torch.Tensor, group_size: int, global_rows: int) -> torch.Tensor:
    """Per row: max(0, mean detached log-ratio of its KL group); every group must be whole in `row`."""
    group = torch.div(row.long(), group_size, rounding_mode="floor")
    ids, inverse, counts = torch.unique(group, return_inverse=True, return_counts=True)
    expected = torch.clamp(global_rows - ids * group_size, max=group_size)
    if not torch.equal(counts, expected):
        raise ValueError(f"kto.kl_group_size={group_size}: a KL group is split across micro-batches; "
                         f"use a micro_batch_size that is a multiple of kl_group_size")
    sums = torch.zeros(len(ids), dtype=log_ratio.dtype, device=log_ratio.device).index_add_(0, inverse, log_ratio.detach())
    return torch.clamp(sums / counts.to(log_ratio.dtype), min=0.0)[inverse]


def kto_sum(logp: torch.Tensor, ref_logp: torch.Tensor, desirable: torch.Tensor, z_ref: torch.Tensor, beta: float,
            desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> tuple[torch.Tensor, Metrics]:
    """Σ over responses of λ_y − v(x, y) and metric sums; 1-D tensors over responses (z_ref is detached)."""
    desirable = desirable.bool()
    reward = logp - ref_logp
    z_ref = z_ref.detach()
    weight = torch.where(desirable, desirable_weight, undesirable_weight).to(logp.dtype)
    value = weight * torch.sigmoid(torch.where(desirable, beta * (reward - z_ref), beta * (z_ref - reward)))
    loss = (weight - value).sum()
    reward = reward.detach()
    return loss, {"sequences": logp.new_tensor(float(logp.numel())), "desirable": desirable.sum().to(logp.dtype),
                  "desirable_log_ratio_sum": torch.where(desirable, reward, 0.0).sum(),
                  "undesirable_log_ratio_sum": torch.where(desirable, 0.0, reward).sum(), "z_ref_sum": z_ref.sum()}


@register("kto", KTOOptions, normalizer="sequences", data_kind="labelled")
def compute(options: KTOOptions, batch: dict[str, torch.Tensor], logprobs: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
    logp = sequence_logp(logprobs, batch["loss_mask"])
    ref = batch["ref_logp"].to(logp.dtype)
    z_ref = kl_reference(logp - ref, batch["row"], options.kl_group_size, int(batch["normalizer"]))
    total, metrics = kto_sum(logp, ref, batch["desirable"], z_ref, options.beta, options.desirable_weight,
                             options.undesirable_weight)
    return total / batch["normalizer"], metrics

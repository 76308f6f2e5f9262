"""`dro`: Direct Reward Optimization as DQO's one-step case (DQO paper §3.1: H = 1 gives DRO's losses).

One action = the whole response: log π(y|x) sums the response tokens' log-probs (likewise π_ref and
the behaviour policy μ), V(x) is the value head at the prompt's last token (the position whose label
is the first response token), and the reward is the trajectory's total (outcome + process rewards).
With T = 1 every λ-return is G(x) = r − β ρ (terminal V = 0), so per response, with ρ = log π/π_ref:

    w · [value_coef · (r − β ρ̄ − V(x))² + (β ρ − (r − V̄(x)))²],   w = exp(min(is_bound, Σ log π̄/μ))

(bars: detached, exactly as in `dqo`). Computed by `dqo.dqo_sum` on [B, 1] tensors: no second copy.
Summed over responses and divided by `normalizer` = responses in the global batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from stepwise.losses.dqo import check_common, dqo_sum, token_inputs
from stepwise.losses.registry import Metrics, register


@dataclass(frozen=True)
class DROOptions:
    beta: float = 0.03  # the DQO paper's β for DRO (appendix B)
    is_bound: float = 1.0  # w = exp(min(is_bound, log π/μ)), as in dqo
    value_coef: float = 1.0

    def __post_init__(self):
        check_common("dro", self.beta, self.is_bound, self.value_coef)


def response_level(batch_tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """[B, S] token tensors -> [B, 1] response-level ones: summed log-probs and rewards, V at the prompt's end."""
    mask = batch_tensors["loss_mask"] > 0
    first = mask.to(torch.int8).argmax(dim=1, keepdim=True)  # position of the first response label
    out = {key: torch.where(mask, batch_tensors[key], 0.0).sum(dim=1, keepdim=True)
           for key in ("logprobs", "ref_logp", "behaviour_logp", "rewards")}
    out["values"] = batch_tensors["values"].gather(1, first)
    out["step_mask"] = mask.any(dim=1, keepdim=True)
    return out


@register("dro", DROOptions, normalizer="sequences", data_kind="trajectory", model_kind="policy_value")
def compute(options: DROOptions, batch: dict[str, torch.Tensor],
            outputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Metrics]:
    r = response_level(token_inputs(batch, outputs))
    total, metrics = dqo_sum(r["logprobs"], r["ref_logp"], r["behaviour_logp"], r["values"], r["rewards"],
                             r["step_mask"], options.beta, lam=1.0, is_bound=options.is_bound,
                             value_coef=options.value_coef)
    return total / batch["normalizer"], metrics

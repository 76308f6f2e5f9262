"""`dqo`: Direct Q-function Optimization (DQO paper, §3, eqs. 8 and 14-16), token-level soft Q-learning.

One action a_h = one response token; s_h = prompt + the tokens before a_h. With
ρ_h = log π_θ(a_h|s_h) − log π_ref(a_h|s_h) and Q_θ(s_h, a_h) = β ρ_h + V_φ(s_h) (eq. 8, π_ref folded
into the KL-regularised reward), per trajectory τ of T real steps (V of the terminal state = 0):

    c_h      = r_h − β ρ_h                                   (β log π_ref/π_θ + r: the soft reward)
    G⁽ⁿ⁾(s_h) = V(s_{h+n}) + Σ_{l<n} c_{h+l}                  (n-step return, n = 1..T−h)
    G^λ(s_h)  standard (default): (1−λ) Σ_{n<T−h} λ^{n−1} G⁽ⁿ⁾ + λ^{T−h−1} G⁽ᵀ⁻ʰ⁾ (weights sum to 1);
              literal_lambda:      (1−λ) Σ_{n≤T−h} λ^{n−1} G⁽ⁿ⁾ for λ < 1, G⁽ᵀ⁻ʰ⁾ for λ = 1 (the paper's
                                   formula as printed; its weights sum to 1 − λ^{T−h})
    L_V = w(τ) Σ_h (G^λ(s_h) − V(s_h))²                                          (eq. 14 / final L_V)
    L_π = w(τ) Σ_h (β ρ_h − (r_h + G^λ(s_{h+1}) − V(s_h)))²,  G^λ(terminal) = 0    (eq. 15 / final L_π)
    w(τ) = exp(min(is_bound, Σ_h log π_θ(a_h|s_h)/μ(a_h|s_h)))                    (eq. 16; is_bound = 1)

Both are computed by one backward recursion, O(T):  G_h = k_h c_h + (1−λ) V_{h+1} + λ G_{h+1}, with
k_h = 1 (standard) or 1 − λ^{T−h} (literal, λ < 1); masked steps are skipped (treated as absent).

Stop-gradients (the paper's bars φ̄, θ̄ and its remark under the final losses):
- w(τ) is fully detached (no gradient through π_θ in the importance weight);
- the targets G^λ(s_h) in L_V and G^λ(s_{h+1}) in L_π are fully detached: both the bootstrapped
  V(s_{h+n}) and the β log π_θ terms inside the n-step returns (G^λ_{φ̄,θ̄});
- V(s_h) inside L_π is detached: L_π is the paper's L_π(θ), minimised over θ only, while V_φ is
  trained by L_V(φ) alone (eq. 15 writes its target G^λ_{φ,θ̄} with φ unbarred, the final L_π bars it;
  either way L_π(θ) takes no φ gradient).
So the gradient reaches log π_θ only through β ρ_h in L_π and V only through V(s_h) in L_V. The
returned loss is value_coef · L_V + L_π (value_coef = 1: the plain sum of the paper's two losses).

The plugin is summed over trajectories and divided by `normalizer` = trajectories in the global batch.
`dro` (one action = the whole response, T = 1) reuses `dqo_sum`; see dro.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from stepwise.losses.registry import Metrics, register


@dataclass(frozen=True)
class DQOOptions:
    beta: float = 0.03  # the paper's β for both DQO and DRO (appendix B)
    lam: float = 1.0  # λ of the λ-return; the paper's best (§4.3.2)
    literal_lambda: bool = False  # True: the paper's printed (1−λ)Σ_{n≤H−h} form, weights summing to 1−λ^{H−h}
    is_bound: float = 1.0  # w(τ) = exp(min(is_bound, Σ log π/μ)); the paper's bound 1 (w ≤ e)
    value_coef: float = 1.0  # weight of L_V beside L_π

    def __post_init__(self):
        check_common("dqo", self.beta, self.is_bound, self.value_coef)
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"dqo.lam must be in [0, 1], got {self.lam}")


def check_common(name: str, beta: float, is_bound: float, value_coef: float) -> None:
    """Option checks shared by `dqo` and `dro`."""
    if not beta > 0:
        raise ValueError(f"{name}.beta must be > 0, got {beta}")
    if math.isnan(is_bound):
        raise ValueError(f"{name}.is_bound must be a number (inf disables the clip), got {is_bound}")
    if not value_coef >= 0:
        raise ValueError(f"{name}.value_coef must be >= 0, got {value_coef}")


@torch.no_grad()
def lambda_returns(soft_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, lam: float,
                   literal_lambda: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(G^λ(s_h), G^λ(s_{h+1})) for every step of [B, H] tensors, by one backward pass over h.

    `soft_rewards` is c_h = r_h − β ρ_h and `values` V(s_h); both are read without gradient. Entries at
    masked steps are meaningless; the next state of a real step is the next real step (or terminal)."""
    batch, horizon = soft_rewards.shape
    zeros = soft_rewards.new_zeros(batch)
    g_next, v_next, lam_power = zeros, zeros, torch.ones_like(zeros)  # lam_power: λ^(real steps from h on)
    returns, next_returns = torch.empty_like(soft_rewards), torch.empty_like(soft_rewards)
    for h in reversed(range(horizon)):
        real = mask[:, h]
        lam_power = torch.where(real, lam_power * lam, lam_power)
        weight = 1.0 - lam_power if literal_lambda and lam < 1.0 else 1.0
        g_h = weight * soft_rewards[:, h] + (1.0 - lam) * v_next + lam * g_next
        returns[:, h], next_returns[:, h] = g_h, g_next
        g_next = torch.where(real, g_h, g_next)
        v_next = torch.where(real, values[:, h], v_next)
    return returns, next_returns


def dqo_sum(logp: torch.Tensor, ref_logp: torch.Tensor, behaviour_logp: torch.Tensor, values: torch.Tensor,
            rewards: torch.Tensor, mask: torch.Tensor, beta: float, lam: float, literal_lambda: bool = False,
            is_bound: float = 1.0, value_coef: float = 1.0) -> tuple[torch.Tensor, Metrics]:
    """Σ over trajectories of w(τ)·(value_coef·L_V + L_π), and metric sums; all inputs are [B, H]."""
    mask = mask.bool()
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    rho = logp - ref_logp
    soft_rewards = rewards - beta * rho.detach()
    returns, next_returns = lambda_returns(soft_rewards, values.detach(), mask, lam, literal_lambda)
    value_residual = torch.where(mask, returns - values, zero)
    policy_residual = torch.where(mask, beta * rho - (rewards + next_returns - values.detach()), zero)
    log_w = torch.where(mask, logp.detach() - behaviour_logp, zero).sum(dim=1)
    w = torch.exp(torch.clamp(log_w, max=is_bound))
    value_loss = w * (value_residual**2).sum(dim=1)
    policy_loss = w * (policy_residual**2).sum(dim=1)
    loss = (value_coef * value_loss + policy_loss).sum()
    metrics = {"sequences": logp.new_tensor(float(logp.shape[0])), "steps": mask.sum().to(logp.dtype),
               "value_loss_sum": value_loss.detach().sum(), "policy_loss_sum": policy_loss.detach().sum(),
               "is_weight_sum": w.sum(), "is_clipped_sum": (log_w > is_bound).sum().to(logp.dtype),
               "log_ratio_sum": torch.where(mask, rho.detach(), zero).sum()}
    return loss, metrics


def dqo_loss(logp: torch.Tensor, ref_logp: torch.Tensor, behaviour_logp: torch.Tensor, values: torch.Tensor,
             rewards: torch.Tensor, mask: torch.Tensor, beta: float, lam: float, literal_lambda: bool = False,
             is_bound: float = 1.0, value_coef: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean over the B trajectories of `dqo_sum`; metrics: value/policy loss, mean w, fraction clipped."""
    total, sums = dqo_sum(logp, ref_logp, behaviour_logp, values, rewards, mask, beta, lam, literal_lambda,
                          is_bound, value_coef)
    count = logp.shape[0]
    return total / count, {"value_loss": float(sums["value_loss_sum"]) / count,
                           "policy_loss": float(sums["policy_loss_sum"]) / count,
                           "is_weight": float(sums["is_weight_sum"]) / count,
                           "is_clipped_fraction": float(sums["is_clipped_sum"]) / count}


def pack_steps(mask: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Move each row's masked positions to the front, in order: [B, S] -> [B, H], H = most steps of a row.

    Returns (step_mask, *packed tensors); gather keeps the gradient of the packed entries."""
    mask = mask.bool()
    counts = mask.sum(dim=1)
    horizon = max(1, int(counts.max())) if mask.numel() else 1
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :horizon]
    step_mask = torch.arange(horizon, device=mask.device).unsqueeze(0) < counts.unsqueeze(1)
    return (step_mask, *(t.gather(1, order) for t in tensors))


def token_inputs(batch: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The per-position tensors of a `trajectory` batch and a `policy_value` model, in the outputs' dtype."""
    for key in ("logprobs", "values"):
        if key not in outputs:
            raise ValueError(f"dqo/dro need model outputs '{key}' (model_kind 'policy_value'); got {sorted(outputs)}")
    dtype = outputs["logprobs"].dtype
    shape = batch["loss_mask"].shape  # packed rows: one row per trajectory against [1, rows x S] outputs
    out = {"logprobs": outputs["logprobs"].expand(shape), "values": outputs["values"].to(dtype).expand(shape)}
    for key in ("loss_mask", "ref_logp", "behaviour_logp", "rewards"):
        if key not in batch:
            raise ValueError(f"dqo/dro need batch key '{key}' (data kind 'trajectory')")
        out[key] = batch[key].to(dtype)
    return out


@register("dqo", DQOOptions, normalizer="sequences", data_kind="trajectory", model_kind="policy_value")
def compute(options: DQOOptions, batch: dict[str, torch.Tensor],
            outputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Metrics]:
    t = token_inputs(batch, outputs)
    step_mask, logp, values, ref, behaviour, rewards = pack_steps(
        t["loss_mask"] > 0, t["logprobs"], t["values"], t["ref_logp"], t["behaviour_logp"], t["rewards"])
    total, metrics = dqo_sum(logp, ref, behaviour, values, rewards, step_mask, options.beta, options.lam,
                             options.literal_lambda, options.is_bound, options.value_coef)
    return total / batch["normalizer"], metrics

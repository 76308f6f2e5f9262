"""DQO / DRO losses: the O(H) recursion against an explicit loop over n-step returns, DRO as the
one-step case, the detached and clipped importance weight, where gradients go, and micro-batch
reslicing invariance of the `dqo` and `dro` plugins."""
from __future__ import annotations

import math

import pytest
import torch

from stepwise import losses
from stepwise.losses.dqo import dqo_loss, dqo_sum, lambda_returns
from stepwise.losses.dro import response_level

BETA = 0.3


def random_steps(seed: int, batch: int = 5, horizon: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = [horizon, 1, 3, horizon - 1, 5][:batch]
    mask = torch.arange(horizon).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    tensor = lambda scale, shift=0.0: torch.rand(batch, horizon, generator=g, dtype=torch.float64) * scale + shift
    return {"logp": tensor(2.0, -2.0), "ref_logp": tensor(2.0, -2.0), "behaviour_logp": tensor(2.0, -2.0),
            "values": tensor(1.0), "rewards": tensor(0.5) * (torch.rand(batch, horizon, generator=g) < 0.4), "mask": mask}


def reference_loss(t: dict[str, torch.Tensor], beta: float, lam: float, literal: bool, bound: float = 1.0) -> float:
    """Mean over trajectories of w (Σ_h (G^λ(s_h) − V(s_h))² + Σ_h (βρ_h − (r_h + G^λ(s_{h+1}) − V(s_h)))²)."""
    total = 0.0
    for b in range(t["logp"].shape[0]):
        steps = [h for h in range(t["logp"].shape[1]) if t["mask"][b, h]]
        T = len(steps)
        rho = [float(t["logp"][b, h] - t["ref_logp"][b, h]) for h in steps]
        r = [float(t["rewards"][b, h]) for h in steps]
        V = [float(t["values"][b, h]) for h in steps] + [0.0]  # terminal value 0

        def n_step(h: int, n: int) -> float:
            return V[h + n] + sum(beta * -rho[h + l] + r[h + l] for l in range(n))

        def lam_return(h: int) -> float:
            if h == T:
                return 0.0
            N = T - h
            if lam == 1.0:
                return n_step(h, N)
            if literal:
                return (1 - lam) * sum(lam ** (n - 1) * n_step(h, n) for n in range(1, N + 1))
            return (1 - lam) * sum(lam ** (n - 1) * n_step(h, n) for n in range(1, N)) + lam ** (N - 1) * n_step(h, N)

        value_loss = sum((lam_return(h) - V[h]) ** 2 for h in range(T))
        policy_loss = sum((beta * rho[h] - (r[h] + lam_return(h + 1) - V[h])) ** 2 for h in range(T))
        log_w = sum(float(t["logp"][b, h] - t["behaviour_logp"][b, h]) for h in steps)
        total += math.exp(min(bound, log_w)) * (value_loss + policy_loss)
    return total / t["logp"].shape[0]


def call(t: dict[str, torch.Tensor], **kwargs):
    return dqo_loss(t["logp"], t["ref_logp"], t["behaviour_logp"], t["values"], t["rewards"], t["mask"], **kwargs)


@pytest.mark.parametrize("lam", [1.0, 0.95, 0.0])
@pytest.mark.parametrize("literal", [False, True])
def test_recursion_matches_explicit_n_step_returns(lam, literal):
    for seed in range(3):
        t = random_steps(seed)
        loss, _ = call(t, beta=BETA, lam=lam, literal_lambda=literal)
        assert loss.item() == pytest.approx(reference_loss(t, BETA, lam, literal), abs=1e-6, rel=0)


def test_literal_and_standard_lambda_differ_only_for_intermediate_lambda():
    t = random_steps(4)
    for lam in (0.0, 1.0):
        assert call(t, beta=BETA, lam=lam)[0].item() == pytest.approx(call(t, beta=BETA, lam=lam, literal_lambda=True)[0].item())
    assert call(t, beta=BETA, lam=0.5)[0].item() != pytest.approx(call(t, beta=BETA, lam=0.5, literal_lambda=True)[0].item())


def test_one_step_case_is_the_dro_loss():
    t = random_steps(5, horizon=1)
    t["mask"] = torch.ones(5, 1, dtype=torch.bool)
    loss, _ = call(t, beta=BETA, lam=0.7)
    rho, r, v = t["logp"] - t["ref_logp"], t["rewards"], t["values"]
    w = torch.exp(torch.clamp(t["logp"] - t["behaviour_logp"], max=1.0))
    # DRO (Richemond et al.), both halves: value (r − βρ − V)², policy (βρ − (r − V))²: the same residual
    expected = (w * 2 * (r - BETA * rho - v) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-12)


def test_importance_weight_is_detached_and_clipped():
    t = random_steps(6)
    t["behaviour_logp"] = t["logp"] - 2.0  # Σ log π/μ ≥ 2 > 1 on every trajectory: all clipped, w = e
    logp = t["logp"].clone().requires_grad_(True)
    loss, metrics = dqo_loss(logp, t["ref_logp"], t["behaviour_logp"], t["values"], t["rewards"], t["mask"], BETA, 1.0)
    assert metrics["is_weight"] == pytest.approx(math.e) and metrics["is_clipped_fraction"] == 1.0
    loss.backward()
    # only the explicit βρ_h of L_π carries gradient: d/dlogp = w · 2 · residual · β / B, w a constant
    rho = t["logp"] - t["ref_logp"]
    _, next_g = lambda_returns(t["rewards"] - BETA * rho, t["values"], t["mask"], 1.0)
    residual = BETA * rho - (t["rewards"] + next_g - t["values"])
    expected = torch.where(t["mask"], math.e * 2 * residual * BETA / 5, 0.0)
    assert torch.allclose(logp.grad, expected, atol=1e-12)


def test_unclipped_weight_is_the_trajectory_ratio():
    t = random_steps(7)
    t["behaviour_logp"] = t["logp"] + 0.1
    _, metrics = call(t, beta=BETA, lam=1.0)
    steps = t["mask"].sum(dim=1).double()
    assert metrics["is_weight"] == pytest.approx(torch.exp(-0.1 * steps).mean().item())
    assert metrics["is_clipped_fraction"] == 0.0


def test_gradients_reach_real_steps_only():
    t = random_steps(8)
    logp = t["logp"].clone().requires_grad_(True)
    values = t["values"].clone().requires_grad_(True)
    loss, _ = dqo_loss(logp, t["ref_logp"], t["behaviour_logp"], values, t["rewards"], t["mask"], BETA, 0.95)
    loss.backward()
    for grad in (logp.grad, values.grad):
        assert (grad[~t["mask"]] == 0).all()
        assert (grad[t["mask"]] != 0).all()


def token_batch(seed: int, rows: int = 4, length: int = 10) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """A `trajectory` micro-batch (prompt prefix, response, right padding) and leaf model outputs."""
    g = torch.Generator().manual_seed(seed)
    loss_mask = torch.zeros(rows, length)
    for row in range(rows):
        start, n = 1 + row % 3, 2 + (row * 3) % 5
        loss_mask[row, start : start + n] = 1.0
    noise = lambda: torch.rand(rows, length, generator=g, dtype=torch.float64) - 1.0
    rewards = torch.zeros(rows, length, dtype=torch.float64)
    last = (loss_mask * torch.arange(length)).argmax(dim=1)
    rewards[torch.arange(rows), last] = (torch.arange(rows) % 2).double()
    batch = {"loss_mask": loss_mask, "ref_logp": noise(), "behaviour_logp": noise(), "rewards": rewards,
             "normalizer": torch.tensor(float(rows))}
    return batch, noise().requires_grad_(True), (noise() + 1.0).requires_grad_(True)


@pytest.mark.parametrize("name", ["dqo", "dro"])
def test_plugin_micro_batch_reslicing_gives_the_same_loss_and_gradient(name):
    plugin = losses.get(name)
    assert plugin.model_kind == "policy_value" and plugin.data_kind == "trajectory"
    options = plugin.parse_options({"beta": BETA})
    batch, logprobs, values = token_batch(9)
    whole, _ = plugin.compute(options, batch, {"logprobs": logprobs, "values": values})
    whole_grads = torch.autograd.grad(whole, (logprobs, values))
    parts = 0.0
    for rows in (slice(0, 2), slice(2, 4)):
        micro = {k: (v[rows] if v.dim() else v) for k, v in batch.items()}
        parts = parts + plugin.compute(options, micro, {"logprobs": logprobs[rows], "values": values[rows]})[0]
    part_grads = torch.autograd.grad(parts, (logprobs, values))
    assert parts.item() == pytest.approx(whole.item(), abs=1e-12)
    for a, b in zip(whole_grads, part_grads):
        assert torch.allclose(a, b, atol=1e-12) and a.abs().sum() > 0


def test_dqo_plugin_equals_the_core_on_packed_steps():
    batch, logprobs, values = token_batch(10)
    plugin = losses.get("dqo")
    loss, metrics = plugin.compute(plugin.parse_options({"beta": BETA, "lam": 0.9}), batch,
                                   {"logprobs": logprobs, "values": values})
    rows = [batch["loss_mask"][b].bool() for b in range(4)]
    H = max(int(m.sum()) for m in rows)
    pack = lambda x: torch.stack([torch.cat([x[b][rows[b]], x.new_zeros(H - int(rows[b].sum()))]) for b in range(4)])
    mask = torch.stack([torch.arange(H) < int(m.sum()) for m in rows])
    core, _ = dqo_loss(pack(logprobs), pack(batch["ref_logp"]), pack(batch["behaviour_logp"]), pack(values),
                       pack(batch["rewards"]), mask, BETA, 0.9)
    assert loss.item() == pytest.approx(core.item(), abs=1e-12) and metrics["steps"].item() == mask.sum()


def test_dro_plugin_reads_the_prompt_value_and_sums_the_response():
    batch, logprobs, values = token_batch(11)
    r = response_level({**batch, "logprobs": logprobs, "values": values})
    first = batch["loss_mask"].argmax(dim=1)
    assert torch.equal(r["values"][:, 0], values[torch.arange(4), first])
    assert torch.allclose(r["logprobs"][:, 0], (logprobs * batch["loss_mask"]).sum(dim=1))
    plugin = losses.get("dro")
    loss, _ = plugin.compute(plugin.parse_options({"beta": BETA}), batch, {"logprobs": logprobs, "values": values})
    core, _ = dqo_sum(r["logprobs"], r["ref_logp"], r["behaviour_logp"], r["values"], r["rewards"],
                      torch.ones(4, 1, dtype=torch.bool), BETA, 0.0)
    assert loss.item() == pytest.approx(core.item() / 4, abs=1e-12)


@pytest.mark.parametrize("name,args,key", [("dqo", {"beta": 0}, "beta"), ("dqo", {"lam": 1.5}, "lam"),
                                           ("dro", {"beta": -1}, "beta"), ("dqo", {"is_bound": float("nan")}, "is_bound"),
                                           ("dro", {"value_coef": -1}, "value_coef")])
def test_bad_options_name_the_key(name, args, key):
    with pytest.raises(ValueError, match=f"{name}.{key}"):
        losses.get(name).parse_options(args)


def test_defaults_follow_the_paper():
    options = losses.get("dqo").parse_options({})
    assert (options.beta, options.lam, options.is_bound, options.literal_lambda) == (0.03, 1.0, 1.0, False)

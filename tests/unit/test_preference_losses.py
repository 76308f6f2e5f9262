"""DPO and KTO: hand-computed values, the detached KTO reference point, and micro-batch reslicing
invariance of the `dpo` and `kto` plugins."""
from __future__ import annotations

import math

import pytest
import torch

from stepwise import losses
from stepwise.losses.dpo import dpo_loss


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_dpo_hand_computed():
    # pair 1: Δ = 0.1 ((−1 + 1.5) − (−2 + 1.8)) = 0.07 ; pair 2: Δ = 0.1 ((−3 + 2) − (−1 + 1.2)) = −0.12
    expected = (math.log(1 + math.exp(-0.07)) + math.log(1 + math.exp(0.12))) / 2
    loss = dpo_loss(torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0]), torch.tensor([-1.5, -2.0]),
                    torch.tensor([-1.8, -1.2]), beta=0.1)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_dpo_plugin_sums_tokens_of_interleaved_pairs():
    plugin = losses.get("dpo")
    assert plugin.parse_options({}).beta == 0.1 and plugin.data_kind == "pair"
    token_logprobs = torch.tensor([[-9.0, -0.4, -0.6], [-9.0, -2.0, 0.0], [-9.0, -1.0, -2.0], [-9.0, -0.5, -0.5]])
    batch = {"loss_mask": torch.tensor([[0, 1, 1], [0, 1, 0], [0, 1, 1], [0, 1, 1]]),
             "ref_logp": torch.tensor([-1.5, -1.8, -2.0, -1.2]), "chosen": torch.tensor([1.0, 0.0, 1.0, 0.0]),
             "normalizer": torch.tensor(4.0)}
    loss, metrics = plugin.compute(plugin.parse_options({}), batch, token_logprobs)
    expected = (math.log(1 + math.exp(-0.07)) + math.log(1 + math.exp(0.12))) / 4
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert metrics["pairs"].item() == 2 and metrics["accuracy_sum"].item() == 1


def test_dpo_rejects_a_split_pair():
    plugin = losses.get("dpo")
    batch = {"loss_mask": torch.ones(3, 2), "ref_logp": torch.zeros(3), "normalizer": torch.tensor(2.0)}
    with pytest.raises(ValueError, match="pair"):
        plugin.compute(plugin.parse_options({}), batch, torch.zeros(3, 2))


def kto_batch() -> tuple[dict, torch.Tensor]:
    # sequence log-probs (tokens at positions 1, 2) −1.0, −2.0, −1.6, −0.8 ; r = logp − ref = 0.4, −0.1, −0.6, 0.2
    token_logprobs = torch.tensor([[-7.0, -0.5, -0.5], [-7.0, -1.0, -1.0], [-7.0, -1.6, 0.0], [-7.0, -0.3, -0.5]],
                                  dtype=torch.float64, requires_grad=True)
    batch = {"loss_mask": torch.tensor([[0, 1, 1], [0, 1, 1], [0, 1, 0], [0, 1, 1]]),
             "ref_logp": torch.tensor([-1.4, -1.9, -1.0, -1.0]), "desirable": torch.tensor([1.0, 0.0, 0.0, 1.0]),
             "row": torch.arange(4), "normalizer": torch.tensor(4.0)}
    return batch, token_logprobs


def test_kto_hand_computed_with_group_reference_points():
    plugin = losses.get("kto")
    options = plugin.parse_options({"beta": 0.1, "undesirable_weight": 1.5, "kl_group_size": 2})
    batch, token_logprobs = kto_batch()
    loss, metrics = plugin.compute(options, batch, token_logprobs)
    # group {0, 1}: z = max(0, (0.4 − 0.1)/2) = 0.15 ; group {2, 3}: z = max(0, (−0.6 + 0.2)/2) = 0
    rows = [1 - sigmoid(0.1 * (0.4 - 0.15)),            # desirable, λ_D = 1
            1.5 - 1.5 * sigmoid(0.1 * (0.15 + 0.1)),   # undesirable, λ_U = 1.5
            1.5 - 1.5 * sigmoid(0.1 * (0.0 + 0.6)),
            1 - sigmoid(0.1 * (0.2 - 0.0))]
    assert loss.item() == pytest.approx(sum(rows) / 4, abs=1e-6)
    assert metrics["z_ref_sum"].item() == pytest.approx(2 * 0.15)
    loss.backward()
    # z_ref is detached: row 0's gradient is d/dr (1 − σ(β(r − z))) / N only, spread on its two tokens
    s = sigmoid(0.1 * (0.4 - 0.15))
    assert token_logprobs.grad[0, 1].item() == pytest.approx(-0.1 * s * (1 - s) / 4, abs=1e-9)
    assert token_logprobs.grad[0, 0].item() == 0


def test_kto_rejects_a_kl_group_split_across_micro_batches():
    plugin = losses.get("kto")
    batch, token_logprobs = kto_batch()
    micro = {k: (v[:2] if v.dim() else v) for k, v in batch.items()}
    with pytest.raises(ValueError, match="kl_group_size"):
        plugin.compute(plugin.parse_options({"kl_group_size": 4}), micro, token_logprobs[:2])


@pytest.mark.parametrize("name,args,key", [("dpo", {"beta": 0}, "beta"), ("kto", {"kl_group_size": 0}, "kl_group_size"),
                                           ("kto", {"desirable_weight": -1.0}, "desirable_weight")])
def test_bad_options_name_the_key(name, args, key):
    with pytest.raises(ValueError, match=f"{name}.{key}"):
        losses.get(name).parse_options(args)


def random_preference_batch(seed: int, rows: int = 8, length: int = 6) -> tuple[dict, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    loss_mask = (torch.arange(length) >= 2).float().expand(rows, -1).clone()
    loss_mask[1::3, -1] = 0.0
    batch = {"loss_mask": loss_mask, "ref_logp": -3 * torch.rand(rows, generator=g, dtype=torch.float64),
             "desirable": (torch.rand(rows, generator=g) < 0.5).float(), "row": torch.arange(rows),
             "chosen": torch.tensor([1.0, 0.0] * (rows // 2)), "normalizer": torch.tensor(float(rows))}
    token_logprobs = (-torch.rand(rows, length, generator=g, dtype=torch.float64)).requires_grad_(True)
    return batch, token_logprobs


@pytest.mark.parametrize("name,args", [("dpo", {}), ("kto", {"kl_group_size": 2}), ("kto", {"kl_group_size": 4})])
def test_plugin_micro_batch_reslicing_gives_the_same_loss_and_gradient(name, args):
    plugin = losses.get(name)
    options = plugin.parse_options(args)
    batch, token_logprobs = random_preference_batch(3)
    if name == "dpo":
        batch["normalizer"] = torch.tensor(4.0)  # pairs
    whole = plugin.compute(options, batch, token_logprobs)[0]
    (whole_grad,) = torch.autograd.grad(whole, token_logprobs)
    parts = sum(plugin.compute(options, {k: (v[rows] if v.dim() else v) for k, v in batch.items()}, token_logprobs[rows])[0]
                for rows in (slice(0, 4), slice(4, 8)))
    (parts_grad,) = torch.autograd.grad(parts, token_logprobs)
    assert parts.item() == pytest.approx(whole.item(), abs=1e-12)
    assert torch.allclose(whole_grad, parts_grad, atol=1e-12) and whole_grad.abs().sum() > 0

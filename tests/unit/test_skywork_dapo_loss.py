"""The Skywork DAPO policy loss: a hand-computed value and the direction of its gradient."""
from __future__ import annotations

import pytest
import torch

from stepwise import losses
from stepwise.losses.skywork_dapo import skywork_dapo_loss


def test_hand_computed_value():
    logp = torch.tensor([-1.0, -2.0])
    ref = torch.tensor([-1.5, -1.0])
    advantage = torch.tensor([0.2, -0.1])
    # residuals: 0.2/0.5 - 0.5 = -0.1 ; -0.1/0.5 - (-1.0) = 0.8 ; mean of ½r² = (0.005 + 0.32) / 2
    assert skywork_dapo_loss(logp, ref, advantage, beta=0.5).item() == pytest.approx(0.1625)


def test_gradient_raises_positive_and_lowers_negative_advantage_actions():
    logp = torch.zeros(2, requires_grad=True)
    loss = skywork_dapo_loss(logp, torch.zeros(2), torch.tensor([0.3, -0.3]), beta=0.1)
    loss.backward()
    # gradient descent moves logp opposite to the gradient
    assert logp.grad[0] < 0 < logp.grad[1]


def test_plugin_sums_action_tokens_and_uses_the_global_normaliser():
    plugin = losses.get("skywork_dapo")
    options = plugin.parse_options({"beta": 0.5})
    token_logprobs = torch.tensor([[-9.0, -0.5, -0.5, 0.0], [-9.0, -2.0, 0.0, 0.0]])
    batch = {"loss_mask": torch.tensor([[0, 1, 1, 0], [0, 1, 0, 0]]), "ref_logp": torch.tensor([-1.5, -1.0]),
             "advantage": torch.tensor([0.2, -0.1]), "normalizer": torch.tensor(4.0)}
    loss, metrics = plugin.compute(options, batch, token_logprobs)
    assert loss.item() == pytest.approx((0.005 + 0.32) / 4)
    assert metrics["actions"].item() == 2


def test_beta_must_be_positive():
    with pytest.raises(ValueError, match="beta"):
        losses.get("skywork_dapo").parse_options({"beta": 0})

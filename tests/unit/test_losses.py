"""The loss registry and the `sft` plugin."""
from __future__ import annotations

import pytest
import torch

from stepwise import losses
from stepwise.losses import registry
from stepwise.losses.sft import sft_loss


def test_unknown_loss_lists_the_registered_ones():
    with pytest.raises(KeyError, match="unknown loss .nope.; registered: .*sft"):
        losses.get("nope")


def test_duplicate_registration_is_an_error():
    with pytest.raises(ValueError, match="already registered"):
        registry.register("sft", object, "tokens", "sft")(lambda *a: None)


def test_unknown_option_names_the_closest():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Options:
        beta: float = 0.1

    plugin = registry.LossPlugin("x", Options, lambda *a: None, "tokens", "sft")
    with pytest.raises(ValueError, match="did you mean 'beta'"):
        plugin.parse_options({"betta": 1})
    assert plugin.parse_options({"beta": 2}).beta == 2


def test_sft_loss_is_masked_sum_over_global_normaliser():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert sft_loss(logprobs, mask, 10.0).item() == pytest.approx((2 + 3 + 4) / 10)

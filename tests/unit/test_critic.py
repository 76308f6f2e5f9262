"""The critic: value head on a GPTModel trunk, one forward per solution equals one per state, the
BCE loss against soft MC targets, and loading a trunk from a policy checkpoint."""
from __future__ import annotations

import pytest
import torch

from stepwise import losses
from stepwise.losses.critic_bce import critic_bce_sum
from stepwise.models.builder import EngineOptions
from stepwise.models.critic import build_critic_model, is_head_key
from stepwise.models.hf_config import arch_from_hf_dict
from stepwise.parallel.runtime import init_parallel
from stepwise.train.value_data import ValueBatches, tokenize_states
from tests.tolerance import output_bound, within

HF_CONFIG = dict(model_type="qwen2", vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=True, initializer_range=0.2)
ARCH = arch_from_hf_dict(HF_CONFIG)


class CharTokenizer:
    """ids = character codes mod 40 (enough to exercise prefix consistency)."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 40 for c in text]}


@pytest.fixture(scope="module")
def critic():
    init_parallel(1, 1, seed=3)
    model = build_critic_model(ARCH, EngineOptions())
    model.eval()
    return model


def test_one_forward_per_solution_equals_one_forward_per_state(critic):
    record = {"prompt": "Q: 3+4*2\n", "steps": ["3+4=7", "7*2=4", "A: 4"], "mc": [0.5, 0.25, 1.0]}
    sequence = tokenize_states([record], CharTokenizer(), 64)[0]
    ids = torch.tensor([sequence["ids"]])
    with torch.no_grad():
        full = critic(ids, torch.arange(ids.shape[1])[None], None)[0, :, 0]
        for position in sequence["positions"]:
            prefix = ids[:, : position + 1]
            alone = critic(prefix, torch.arange(prefix.shape[1])[None], None)[0, -1, 0]
            # the prefix alone sums attention over fewer (masked-out) keys: summation order only
            within(f"state at {position} alone vs in the solution", abs(alone.item() - full[position].item()),
                   output_bound(float(full.abs().max()), HF_CONFIG, ids.shape[1]))
    assert len(sequence["positions"]) == 3 and sequence["positions"][0] == len(record["prompt"]) - 1


def test_bce_plugin_reads_values_at_state_ends_with_soft_targets(critic):
    records = [{"prompt": "Q: 1+1\n", "steps": ["1+1=2", "A: 2"], "mc": [0.75, 1.0]},
               {"prompt": "Q: 2*3\n", "steps": ["2*3=6", "A: 6"], "mc": [0.0]}]
    batches = ValueBatches(tokenize_states(records, CharTokenizer(), 64), 0, 64, 2)
    (batch,) = batches.micro_batches([0, 1], 0, 1)
    assert batch["normalizer"].item() == 3
    head = torch.randn(batch["input_ids"].shape)
    plugin = losses.get("critic_bce")
    loss, metrics = plugin.compute(plugin.parse_options({}), batch, head)
    mask = batch["value_mask"].bool()
    expected = -(batch["value_target"][mask] * torch.log(torch.sigmoid(head[mask]))
                 + (1 - batch["value_target"][mask]) * torch.log(1 - torch.sigmoid(head[mask]))).sum() / 3
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["states"].item() == 3 and plugin.model_kind == "critic"


def test_soft_target_bce_is_minimal_at_the_target():
    targets = torch.tensor([0.3])
    at = critic_bce_sum(torch.logit(targets), targets)
    assert at < critic_bce_sum(torch.logit(targets) + 0.2, targets)
    assert at < critic_bce_sum(torch.logit(targets) - 0.2, targets)


def test_head_keys_are_recognised():
    assert is_head_key("output_layer.weight") and not is_head_key("decoder.final_layernorm.weight")

"""The weight-mapping engine and the Qwen2 table: transforms round-trip, coverage is exact, and
missing / unknown keys are named; sharded safetensors read like one file; generation_config ids."""
from __future__ import annotations

import pytest
import torch

from stepwise.convert.hf_io import read_hf_state
from stepwise.convert.mapping import MappingError, Rule, hf_to_megatron_state, megatron_to_hf_state, to_hf_tensors, to_megatron_tensor
from stepwise.convert.megatron_to_hf import generation_config
from stepwise.convert.tables import rules_for
from stepwise.models.builder import EngineOptions, padded_vocab_size
from stepwise.models.hf_config import arch_from_hf, arch_from_hf_dict
from tests.conftest import FIXTURES
from tests.helpers import make_tiny_hf_qwen2

ARCH = arch_from_hf_dict(dict(model_type="qwen2", vocab_size=50, hidden_size=32, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, intermediate_size=48))


def hf_state(arch=ARCH) -> dict:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=arch.vocab_size, hidden_size=arch.hidden_size, num_hidden_layers=arch.num_layers,
                         num_attention_heads=arch.num_attention_heads, num_key_value_heads=arch.num_kv_heads,
                         intermediate_size=arch.ffn_hidden_size, tie_word_embeddings=arch.tie_word_embeddings)
    state = Qwen2ForCausalLM(config).state_dict()
    if arch.tie_word_embeddings:
        state.pop("lm_head.weight")
    return state


def test_qkv_fuses_per_kv_group_and_splits_back():
    d, heads, groups = ARCH.head_dim, ARCH.num_attention_heads, ARCH.num_kv_heads
    q = torch.arange(heads * d, dtype=torch.float32)[:, None].repeat(1, 3)
    k = 1000 + torch.arange(groups * d, dtype=torch.float32)[:, None].repeat(1, 3)
    v = 2000 + torch.arange(groups * d, dtype=torch.float32)[:, None].repeat(1, 3)
    fused = to_megatron_tensor(Rule(("q", "k", "v"), "qkv", "qkv"), [q, k, v], ARCH, 0)
    per_group = heads // groups
    # group 0: q heads 0..1, then k head 0, then v head 0
    assert torch.equal(fused[: per_group * d], q[: per_group * d])
    assert torch.equal(fused[per_group * d : per_group * d + d], k[:d])
    assert torch.equal(fused[per_group * d + d : (per_group + 2) * d], v[:d])
    for original, back in zip((q, k, v), to_hf_tensors(Rule(("q", "k", "v"), "qkv", "qkv"), fused, ARCH)):
        assert torch.equal(original, back)


def test_gate_up_stacks_gate_then_up_and_splits_back():
    gate, up = torch.randn(48, 32), torch.randn(48, 32)
    rule = Rule(("gate", "up"), "fc1", "gate_up")
    fc1 = to_megatron_tensor(rule, [gate, up], ARCH, 0)
    assert fc1.shape == (96, 32) and torch.equal(fc1[:48], gate) and torch.equal(fc1[48:], up)
    back = to_hf_tensors(rule, fc1, ARCH)
    assert torch.equal(back[0], gate) and torch.equal(back[1], up)


def test_vocab_rows_are_padded_and_sliced():
    rule = Rule(("e",), "e", "vocab")
    padded = to_megatron_tensor(rule, [torch.ones(50, 4)], ARCH, 128)
    assert padded.shape == (128, 4) and padded[50:].abs().sum() == 0
    assert to_hf_tensors(rule, padded, ARCH)[0].shape == (50, 4)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_every_key_of_the_tiny_models_maps_exactly_once_both_ways(tmp_path, tie):
    hf_dir = make_tiny_hf_qwen2(tmp_path, tie=tie)
    arch, state = arch_from_hf(hf_dir), read_hf_state(hf_dir)
    if tie:  # transformers may store the shared matrix a second time as lm_head.weight; conversion drops it
        state.pop("lm_head.weight", None)
    rules = rules_for(arch)
    used = [name for rule in rules for names, _ in rule.expand(arch.num_layers) for name in names]
    assert sorted(used) == sorted(state)  # each HF key used by exactly one rule, none left over
    megatron = hf_to_megatron_state(rules, state, arch, padded_vocab_size(arch.vocab_size, EngineOptions()))
    assert ("output_layer.weight" in megatron) == (not tie)
    assert megatron["embedding.word_embeddings.weight"].shape[0] == 128
    back = megatron_to_hf_state(rules, megatron, arch)
    assert back.keys() == state.keys()
    assert all(torch.equal(state[k], back[k]) for k in state)


def test_missing_and_unknown_keys_are_named():
    state = hf_state()
    del state["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(MappingError, match="model.layers.1.mlp.up_proj.weight"):
        hf_to_megatron_state(rules_for(ARCH), state, ARCH, 128)
    state = hf_state()
    state["model.layers.0.self_attn.rotary.inv_freq"] = torch.zeros(2)
    with pytest.raises(MappingError, match="rotary.inv_freq"):
        hf_to_megatron_state(rules_for(ARCH), state, ARCH, 128)
    megatron = hf_to_megatron_state(rules_for(ARCH), hf_state(), ARCH, 128)
    megatron["decoder.layers.9.extra.weight"] = torch.zeros(1)
    with pytest.raises(MappingError, match="decoder.layers.9.extra.weight"):
        megatron_to_hf_state(rules_for(ARCH), megatron, ARCH)


@pytest.mark.parametrize("name", ["Qwen2.5-72B-Instruct", "Qwen2.5-0.5B-Instruct", "Qwen2-7B-Instruct"])
def test_real_configs_give_tables_with_the_right_untied_and_bias_rules(name):
    arch = arch_from_hf(FIXTURES / "configs" / f"{name}.json")
    targets = {rule.megatron for rule in rules_for(arch)}
    assert ("output_layer.weight" in targets) == (not arch.tie_word_embeddings)
    assert "decoder.layers.{i}.self_attention.linear_qkv.bias" in targets


def test_sharded_safetensors_read_like_one_file(tmp_path):
    from transformers import AutoModelForCausalLM

    hf_dir = make_tiny_hf_qwen2(tmp_path / "one", tie=False)
    AutoModelForCausalLM.from_pretrained(str(hf_dir)).save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    single, sharded = read_hf_state(hf_dir), read_hf_state(tmp_path / "sharded")
    assert single.keys() == sharded.keys() and all(torch.equal(single[k], sharded[k]) for k in single)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        read_hf_state(tmp_path)


def test_generation_config_takes_ids_from_the_tokenizer_and_keeps_extra_eos(tmp_path):
    import json

    hf_dir = make_tiny_hf_qwen2(tmp_path, tie=True)  # tokenizer: <pad> 0, </s> 1
    (hf_dir / "generation_config.json").unlink()
    assert generation_config(hf_dir, {"eos_token_id": 7}) == {"do_sample": False, "eos_token_id": 1, "pad_token_id": 0}
    (hf_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 6], "temperature": 0.7}))
    assert generation_config(hf_dir, {}) == {"eos_token_id": [5, 6, 1], "pad_token_id": 0, "temperature": 0.7}

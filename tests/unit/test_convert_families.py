"""Llama 3.x / Gemma 1.x config reading, llama3 rope frequencies against transformers', the
checkpoint key layout against megatron's own sharded_state_dict, streamed sharded safetensors, and
unknown / missing keys named by the streaming converters."""
from __future__ import annotations

import json

import pytest
import torch

from stepwise.convert import dist_io
from stepwise.convert.hf_io import INDEX, HFSource, read_hf_state
from stepwise.convert.mapping import MappingError, megatron_shape, pairs
from stepwise.convert.safetensors_out import TensorSpec, parse_size, plan_shards, write_sharded
from stepwise.convert.tables import rules_for
from stepwise.models.builder import EngineOptions, padded_vocab_size
from stepwise.models.hf_config import ConfigError, arch_from_hf, arch_from_hf_dict
from stepwise.models.variants import llama3_inv_freq
from tests.conftest import FIXTURES
from tests.family_models import FAMILIES, make_family_model

CONFIGS = FIXTURES / "configs"


def test_published_llama_and_gemma_configs_read_as_their_families():
    llama = arch_from_hf(CONFIGS / "Llama-3.1-8B-Instruct.json")
    assert (llama.family, llama.tie_word_embeddings, llama.qkv_bias, llama.activation) == ("llama", False, False, "silu")
    assert llama.rope_scaling["rope_type"] == "llama3" and llama.rope_scaling["factor"] == 8.0
    assert (llama.num_kv_heads, llama.head_dim, llama.rope_theta) == (8, 128, 500000.0)
    gemma = arch_from_hf(CONFIGS / "gemma-1.1-7b-it.json")  # no tie key: Gemma ties by default
    assert (gemma.family, gemma.tie_word_embeddings, gemma.activation) == ("gemma", True, "gelu_tanh")
    assert gemma.head_dim == 256 != gemma.hidden_size // gemma.num_attention_heads
    assert gemma.zero_centered_norm and gemma.scale_embeddings and not llama.zero_centered_norm
    qwen = arch_from_hf(CONFIGS / "Qwen2.5-Math-7B-Instruct.json")
    assert not (qwen.zero_centered_norm or qwen.scale_embeddings) and qwen.qkv_bias


@pytest.mark.parametrize("change, named", [
    ({"attention_bias": True}, "attention_bias"), ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "relu"}, "hidden_act"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}},
     "original_max_position_embeddings"),
])
def test_configs_megatron_would_not_reproduce_are_refused_by_key(change, named):
    config = json.loads((CONFIGS / "Llama-3.1-8B-Instruct.json").read_text())
    with pytest.raises(ConfigError, match=named):
        arch_from_hf_dict({**config, **change})


@pytest.mark.parametrize("rope", [None, {"original_max_position_embeddings": 16, "factor": 4.0, "high_freq_factor": 8.0}])
def test_llama3_frequencies_equal_transformers(rope):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = json.loads((CONFIGS / "Llama-3.1-8B-Instruct.json").read_text())
    if rope:
        config["rope_scaling"] = {**config["rope_scaling"], **rope}
    arch = arch_from_hf_dict(config)
    expected = LlamaRotaryEmbedding(LlamaConfig(**{k: v for k, v in config.items() if k != "model_type"})).inv_freq
    ours = llama3_inv_freq(arch.head_dim, arch.rope_theta, arch.rope_scaling)
    unscaled = 1.0 / arch.rope_theta ** (torch.arange(0, arch.head_dim, 2).float() / arch.head_dim)
    assert torch.equal(ours, expected) and not torch.equal(ours, unscaled)


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_checkpoint_keys_are_megatrons_own(tmp_path, family):
    """Every tensor and object key megatron's sharded_state_dict asks for, with the same global shape."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, apply_factories
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    from stepwise.models.builder import build_gpt_model
    from stepwise.parallel.runtime import init_parallel

    hf_dir = make_family_model(family, tmp_path)
    arch, source = arch_from_hf(hf_dir), HFSource(hf_dir)
    init_parallel(1, 1)
    state = build_gpt_model(arch, EngineOptions()).sharded_state_dict()
    apply_factories(state)
    theirs = {v.key: tuple(v.global_shape) for v in nested_values(state) if isinstance(v, ShardedTensor)}
    their_objects = {v.unique_key for v in nested_values(state) if isinstance(v, ShardedObject)}
    padded = padded_vocab_size(arch.vocab_size, EngineOptions())
    ours, names = {}, []
    for rule, hf_names, name in pairs(rules_for(arch), arch):
        shape = megatron_shape(rule, [source.shape[n] for n in hf_names], arch, padded)
        placeholder = dist_io.sharded_tensor(name, torch.empty(shape, device="meta"), arch.num_layers)
        ours[placeholder.key] = tuple(placeholder.global_shape)
        names.append(name)
    assert ours == theirs
    # the local spec's objects are among ours (which add the TE modules': tests/unit/test_te_spec.py)
    assert their_objects <= {o.unique_key for o in dist_io.extra_state_objects(names, arch.num_layers).values()}


def test_streamed_safetensors_shard_index_and_replace_an_older_export(tmp_path):
    assert (parse_size("5GB"), parse_size("500MB"), parse_size("2GiB"), parse_size(7)) == (5 * 10**9, 5 * 10**8, 2**31, 7)
    with pytest.raises(ValueError, match="bad size"):
        parse_size("5 parsecs")
    tensors = {f"t{i}": torch.randn(i + 1, 8).to(torch.bfloat16 if i % 2 else torch.float32) for i in range(6)}
    specs = [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    assert [len(s) for s in plan_shards(specs, 100)] == [2, 1, 1, 1, 1]  # 32+32 | 96 | 64 | 160 (alone) | 96
    assert len(plan_shards(specs, 10**6)) == 1
    (tmp_path / "model.safetensors").write_bytes(b"stale")  # an older single-file export
    summary = write_sharded(specs, iter(tensors.items()), tmp_path, max_shard_size=200)
    assert len(summary["files"]) > 1 and not (tmp_path / "model.safetensors").exists()
    index = json.loads((tmp_path / INDEX).read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    back = read_hf_state(tmp_path)
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    write_sharded(specs, iter(tensors.items()), tmp_path)  # one shard again: the index and shards go
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    with pytest.raises(ValueError, match="planned 't0'"):
        write_sharded(specs, iter(reversed(list(tensors.items()))), tmp_path / "bad")
    assert list((tmp_path / "bad").iterdir()) == []  # no temporary file left behind


def _resave(hf_dir, change) -> None:
    from safetensors.torch import save_file

    state = read_hf_state(hf_dir)
    change(state)
    save_file(state, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("change, named", [
    (lambda s: s.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(8)}), "rotary_emb.inv_freq"),
    (lambda s: s.pop("model.layers.1.mlp.up_proj.weight"), "model.layers.1.mlp.up_proj.weight"),
    (lambda s: s.update({"lm_head.weight": torch.zeros_like(s["model.embed_tokens.weight"])}), "lm_head.weight differs"),
])
def test_hf_to_megatron_names_unknown_missing_and_untied_keys(tmp_path, change, named):
    from stepwise.convert.hf_to_megatron import convert_hf_to_megatron

    hf_dir = make_family_model("gemma", tmp_path / "hf")
    _resave(hf_dir, change)
    with pytest.raises(MappingError, match=named):
        convert_hf_to_megatron(hf_dir, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_megatron_to_hf_names_unknown_and_missing_checkpoint_keys(tmp_path, monkeypatch):
    from stepwise.convert import megatron_to_hf
    from stepwise.convert.hf_to_megatron import convert_hf_to_megatron
    from stepwise.convert.mapping import Rule

    hf_dir = make_family_model("llama3", tmp_path / "hf")
    convert_hf_to_megatron(hf_dir, tmp_path / "ckpt", progress=False)
    table = rules_for(arch_from_hf(hf_dir))
    monkeypatch.setattr(megatron_to_hf, "rules_for", lambda arch, value_head: table[:-2] + table[-1:])
    with pytest.raises(MappingError, match="no rule maps: \\['decoder.final_layernorm.weight'\\]"):
        megatron_to_hf.convert_megatron_to_hf(tmp_path / "ckpt", tmp_path / "back", progress=False)
    extra = Rule(("model.layers.{i}.self_attn.o_proj.bias",), "decoder.layers.{i}.self_attention.linear_proj.bias")
    monkeypatch.setattr(megatron_to_hf, "rules_for", lambda arch, value_head: table + [extra])
    with pytest.raises(MappingError, match="missing 'decoder.layers.0.self_attention.linear_proj.bias'"):
        megatron_to_hf.convert_megatron_to_hf(tmp_path / "ckpt", tmp_path / "back", progress=False)
    assert not (tmp_path / "back").exists()


def test_clis_print_a_summary_and_take_dtype_and_a_template(tmp_path, capsys):
    import shutil

    from stepwise.checkpoint.layout import CheckpointError
    from stepwise.convert import hf_to_megatron, megatron_to_hf

    hf_dir = make_family_model("gemma", tmp_path / "source")  # not tmp_path/hf: that would sit beside ckpt/
    argv = ["--hf", str(hf_dir), "--out", str(tmp_path / "ckpt"), "--dtype", "bfloat16", "--no-progress"]
    assert hf_to_megatron.main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["dtype"] == "bfloat16" and summary["tensors"] == 20 and summary["bytes"] > 0 and "seconds" in summary
    shutil.rmtree(tmp_path / "ckpt" / "hf")  # no config beside the checkpoint: the template supplies it
    with pytest.raises(CheckpointError, match="hf/config.json"):
        megatron_to_hf.convert_megatron_to_hf(tmp_path / "ckpt", tmp_path / "back", progress=False)
    argv = ["--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "back"), "--hf-template", str(hf_dir),
            "--dtype", "float32", "--max-shard-size", "100KB", "--no-progress"]
    assert megatron_to_hf.main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["dtype"], summary["tensors"]) == ("float32", 20) and summary["files"] > 1
    back, original = read_hf_state(tmp_path / "back"), read_hf_state(hf_dir)
    assert all(back[k].dtype == torch.float32 and torch.equal(back[k], original[k].bfloat16().float()) for k in original)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["model_type"] == "gemma"


def test_a_value_head_is_an_unknown_key_unless_the_checkpoint_is_a_policy_value_model(tmp_path, monkeypatch):
    from stepwise.checkpoint import layout
    from stepwise.convert.hf_to_megatron import convert_hf_to_megatron
    from stepwise.convert.megatron_to_hf import convert_megatron_to_hf

    save = dist_io.save_streamed
    head = dist_io.Entry("value_head.weight", (1, 64), torch.float32, lambda: torch.ones(1, 64))
    monkeypatch.setattr(dist_io, "save_streamed", lambda entries, *args, **kw: save(entries + [head], *args, **kw))
    hf_dir = make_family_model("llama3", tmp_path / "source")
    convert_hf_to_megatron(hf_dir, tmp_path / "ckpt", progress=False)  # as DQO training would leave it
    with pytest.raises(MappingError, match="value_head.weight"):
        convert_megatron_to_hf(tmp_path / "ckpt", tmp_path / "back", progress=False)
    meta_file = layout.resolve(tmp_path / "ckpt") / layout.META
    meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), "model_kind": "policy_value"}))
    assert convert_megatron_to_hf(tmp_path / "ckpt", tmp_path / "back", progress=False)["dropped"] == ["value_head.weight"]
    original, back = read_hf_state(hf_dir), read_hf_state(tmp_path / "back")
    assert original.keys() == back.keys() and all(torch.equal(original[k], back[k]) for k in original)

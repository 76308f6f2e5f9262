"""NeMo 2 model configs (`context/model.yaml`, or io.json through nemo-toolkit) -> HF config.json: the
configs NeMo's HF importers make from published models map back to those models' architecture, a
NeMo preset (Llama31Config8B) maps to Llama 3.1 8B, and what stepwise would not reproduce is named."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import pytest
import torch

from stepwise.convert.nemo_config import (NemoCheckpointError, hf_config_from_nemo, model_from_context,
                                          resolve_hf_config)
from stepwise.models.hf_config import arch_from_hf, arch_from_hf_dict
from tests.conftest import FIXTURES
from tests.nemo_models import NEMO, model_yaml

CONFIGS = FIXTURES / "configs"
PUBLISHED = ("Llama-3.1-8B-Instruct", "Qwen2-7B-Instruct", "Qwen2.5-Math-7B-Instruct", "gemma-1.1-7b-it")


def published(name: str) -> dict:
    return json.loads((CONFIGS / f"{name}.json").read_text())


@pytest.mark.parametrize("name", PUBLISHED)
def test_importer_configs_of_published_models_map_back_to_them(name):
    """model.yaml as NeMo's HF importer writes it; the published config.json as the template (Gemma's
    importer records no vocab_size: it comes from the template)."""
    template = CONFIGS / f"{name}.json"
    config, overridden = resolve_hf_config(model_yaml(published(name)), "model.yaml", template, None)
    assert arch_from_hf_dict(config) == arch_from_hf(template) and overridden == []
    if model_yaml(published(name))["config"]["vocab_size"]:  # without a template too
        assert arch_from_hf_dict(hf_config_from_nemo(model_yaml(published(name)), "model.yaml")) == arch_from_hf(template)


def test_nemo_preset_llama31_8b_is_llama_31_8b():
    """Llama31Config8B's fields as model.yaml lists them (NeMo llama.py: LlamaConfig, Llama3Config,
    Llama31Config, Llama31Config8B; GPTConfig leaves vocab_size None)."""
    config = {"_target_": NEMO + "llama.Llama31Config8B", "num_layers": 32, "hidden_size": 4096,
              "ffn_hidden_size": 14336, "num_attention_heads": 32, "num_query_groups": 8, "kv_channels": None,
              "rotary_base": 500000, "seq_length": 131072, "layernorm_epsilon": 1e-05, "init_method_std": 0.02,
              "normalization": "RMSNorm", "gated_linear_unit": True, "add_bias_linear": False,
              "position_embedding_type": "rope", "rotary_percent": 1.0, "share_embeddings_and_output_weights": False,
              "activation_func": {"_target_": "torch.nn.functional.silu", "_call_": False},
              "scale_factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "old_context_len": 8192,
              "vocab_size": None, "make_vocab_size_divisible_by": 128}
    template = CONFIGS / "Llama-3.1-8B-Instruct.json"
    hf, overridden = resolve_hf_config({"_target_": NEMO + "llama.LlamaModel", "config": config}, "model.yaml",
                                       template, None)
    assert arch_from_hf_dict(hf) == arch_from_hf(template) and overridden == []
    assert hf["bos_token_id"] == 128000  # from the template


TINY_LLAMA = {"model_type": "llama", "vocab_size": 97, "hidden_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96, "rms_norm_eps": 1e-6,
              "rope_theta": 500000.0, "max_position_embeddings": 256,
              "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 16}}
TINY_GEMMA = dict(TINY_LLAMA, model_type="gemma", head_dim=32, hidden_act="gelu_pytorch_tanh", rope_scaling=None)


@pytest.mark.parametrize("hf, changes, named", [
    (TINY_LLAMA, {"_target_": NEMO + "gemma2.Gemma2Model"}, r"_target_ '.*Gemma2Model' is not a supported model"),
    (TINY_LLAMA, {"num_moe_experts": 16}, r"config\.num_moe_experts=16 is not supported"),
    (TINY_LLAMA, {"add_qkv_bias": True}, r"config\.add_qkv_bias=True is not supported"),
    (TINY_LLAMA, {"position_embedding_type": "learned_absolute"}, r"config\.position_embedding_type="),
    (TINY_LLAMA, {"activation_func": {"_target_": "nemo.collections.llm.fn.activation.squared_relu"}},
     r"config\.activation_func 'squared_relu' is not supported"),
    (TINY_LLAMA, {"num_layers": None}, r"missing key 'config\.num_layers'"),
    (TINY_LLAMA, {"old_context_len": None}, r"rope scaling needs config\.old_context_len"),
    (TINY_GEMMA, {"layernorm_zero_centered_gamma": False}, r"config\.layernorm_zero_centered_gamma=False"),
])
def test_what_stepwise_would_not_build_is_named(hf, changes, named):
    document = model_yaml(hf)
    document["_target_"] = changes.pop("_target_", document["_target_"])
    document["config"].update(changes)
    with pytest.raises(NemoCheckpointError, match="model.yaml: .*" + named):
        hf_config_from_nemo(document, "model.yaml")


def test_vocab_size_unknown_without_tokenizer_or_template_is_named():
    with pytest.raises(NemoCheckpointError, match=r"model\.yaml: config\.vocab_size is null .* --hf-template"):
        resolve_hf_config(model_yaml(TINY_GEMMA), "model.yaml", None, None)


def test_io_json_context_read_through_nemo_maps_like_model_yaml(tmp_path: Path):
    """nemo-toolkit's load_context gives the config dataclass (post-init: kv_channels, groups filled)
    and the model's fiddle config; both become the model.yaml dict."""
    @dataclasses.dataclass
    class Llama31Config:
        num_layers: int = 2
        hidden_size: int = 64
        num_attention_heads: int = 4
        num_query_groups: int = 2
        kv_channels: int = 16
        ffn_hidden_size: int = 96
        seq_length: int = 256
        vocab_size: int = 97
        layernorm_epsilon: float = 1e-6
        rotary_base: float = 500000.0
        share_embeddings_and_output_weights: bool = False
        activation_func: Callable = torch.nn.functional.silu
        params_dtype: torch.dtype = torch.bfloat16
        scale_factor: float = 8.0
        low_freq_factor: float = 1.0
        high_freq_factor: float = 4.0
        old_context_len: int = 16

    model_class = type("LlamaModel", (), {"__module__": NEMO + "llama"})
    fiddle_config = type("Config", (), {"__fn_or_cls__": model_class})()

    def load_context(path, subpath=None, build=True):
        assert path == tmp_path
        return Llama31Config() if subpath == "model.config" else fiddle_config

    document = model_from_context(load_context, tmp_path)
    assert document["config"]["activation_func"] == {"_target_": "torch.nn.functional.silu"}
    hf = arch_from_hf_dict(hf_config_from_nemo(document, "io.json"))
    assert hf == arch_from_hf_dict(dict(TINY_LLAMA, initializer_range=0.02))

"""Model FLOPs per training token and MFU (stepwise.models.flops), checked on Qwen2.5-0.5B's shape."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from stepwise.models.flops import bf16_peak_flops, matmul_weights, mfu, train_flops_per_token
from stepwise.models.hf_config import arch_from_hf_dict

CONFIG = json.loads((Path(__file__).resolve().parents[1] / "fixtures/configs/Qwen2.5-0.5B-Instruct.json").read_text())
ARCH = arch_from_hf_dict(CONFIG)


def test_matmul_weights_are_the_linear_layers_of_the_transformers_model():
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in CONFIG.items() if k != "torch_dtype"}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**fields))
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))  # lm_head included
    assert matmul_weights(ARCH) == linear == 493_961_216


def test_train_flops_are_six_per_weight_plus_causal_attention():
    seq = 2048
    q_width = ARCH.num_attention_heads * ARCH.head_dim
    assert train_flops_per_token(ARCH, seq) == 6 * matmul_weights(ARCH) + 6 * ARCH.num_layers * seq * q_width
    assert train_flops_per_token(ARCH, seq) == 3_228_008_448


def test_mfu_against_the_named_gpu_peak():
    assert bf16_peak_flops("NVIDIA H100 80GB HBM3") == bf16_peak_flops("NVIDIA H200") == 989.4e12
    assert bf16_peak_flops("NVIDIA H100 PCIe") == 756e12 and bf16_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert bf16_peak_flops("cpu") is None
    tokens_per_s = 989.4e12 / 3_228_008_448 / 2  # half the peak's worth of tokens
    assert abs(mfu(tokens_per_s, ARCH, 2048, 989.4e12) - 0.5) < 1e-12

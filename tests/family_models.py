"""Tiny random-weight HF checkpoints of each convertible family, made with transformers itself.

Hidden 64, 2 layers, vocabulary 97; large init and perturbed norms so a dropped, transposed or
offset tensor shows in the logits. Llama uses llama3 rope scaling with a short original context so
the scaling changes frequencies; Gemma has head_dim 32 != hidden / heads.
"""
from __future__ import annotations

from pathlib import Path

import torch

from tests.helpers import make_tiny_hf_qwen2

VOCAB = 97
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=96, max_position_embeddings=256, initializer_range=0.2, rms_norm_eps=1e-6)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
FAMILIES = ("qwen2-tied", "qwen2-untied", "llama3", "gemma")


def _perturbed(model, dtype: torch.dtype, seed: int):
    torch.manual_seed(seed + 1)
    model = model.to(dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.3 * torch.randn_like(param))
    return model


def make_family_model(family: str, directory: str | Path, dtype: torch.dtype = torch.float32, seed: int = 0,
                      **overrides) -> Path:
    """Save a tiny random HF model of `family` (one of FAMILIES) to `directory`; returns it."""
    from transformers import GemmaConfig, GemmaForCausalLM, LlamaConfig, LlamaForCausalLM

    directory = Path(directory)
    if family.startswith("qwen2"):
        return make_tiny_hf_qwen2(directory, dtype=dtype, tie=family == "qwen2-tied", seed=seed)
    torch.manual_seed(seed)
    if family == "llama3":
        config = LlamaConfig(**dict(COMMON, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE, tie_word_embeddings=False,
                                    **overrides))
        model = LlamaForCausalLM(config)
    elif family == "gemma":
        config = GemmaConfig(**dict(COMMON, head_dim=32, hidden_act="gelu_pytorch_tanh", **overrides))
        model = GemmaForCausalLM(config)
    else:
        raise ValueError(f"unknown family {family!r} (known: {FAMILIES})")
    _perturbed(model, dtype, seed).save_pretrained(directory)
    return directory


def make_wide_qwen2(directory: str | Path, layers: int = 12, hidden: int = 512) -> int:
    """A Qwen2 checkpoint big enough to measure memory (fp32, random normal weights, written without
    building the model); returns its bytes."""
    from safetensors.torch import save_file
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=1024, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=8,
                         num_key_value_heads=4, intermediate_size=3 * hidden, tie_word_embeddings=False,
                         max_position_embeddings=256)
    with torch.device("meta"):
        shapes = {name: tensor.shape for name, tensor in Qwen2ForCausalLM(config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    state = {name: torch.randn(shape, generator=generator) * 0.02 for name, shape in shapes.items()}
    directory = Path(directory)
    config.save_pretrained(directory)
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return sum(t.numel() * t.element_size() for t in state.values())

"""Tiny random-weight HF models with the shape ratios of real checkpoints (no hub access needed)."""
from __future__ import annotations

from pathlib import Path

import torch

# Qwen2.5-0.5B-Instruct ratios: 14 heads / 2 KV heads (7:1 GQA), head_dim 64 scaled to 4, tied.
QWEN25_SMALL = dict(hidden_size=56, num_attention_heads=14, num_key_value_heads=2, intermediate_size=152,
                    num_hidden_layers=2, tie_word_embeddings=True)
# Qwen2-7B-Instruct ratios: 28 heads / 4 KV heads (7:1 GQA), untied.
QWEN2_7B_SMALL = dict(hidden_size=112, num_attention_heads=14, num_key_value_heads=2, intermediate_size=296,
                      num_hidden_layers=2, tie_word_embeddings=False)


def make_tiny_hf_qwen2(directory: str | Path, dtype: torch.dtype = torch.float32, tie: bool = True,
                       seed: int = 0, vocab_size: int = 97) -> Path:
    """Save a random Qwen2ForCausalLM (large init so logits vary) to `directory`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shape = QWEN25_SMALL if tie else QWEN2_7B_SMALL
    config = Qwen2Config(vocab_size=vocab_size, max_position_embeddings=128, rope_theta=1_000_000.0,
                         rms_norm_eps=1e-6, initializer_range=0.2, **shape)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(dtype)
    with torch.no_grad():  # non-trivial norms and biases, so a transposed or dropped tensor shows
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.3 * torch.randn_like(param))
    directory = Path(directory)
    model.save_pretrained(directory)
    return directory

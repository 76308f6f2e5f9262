"""Family numerics megatron-core's GPTModel does not carry itself, written to match transformers.

- `ACTIVATIONS`: the gated-MLP activations by name (SwiGLU's silu; GeGLU's tanh-approximated gelu).
- `llama3_inv_freq`: rope inverse frequencies under `rope_type: llama3` with all four of its parameters
  (megatron-core 0.16's `rope_scaling` hard-codes low/high frequency factors 1/4 and an original
  context of 8192, so the frequencies are recomputed here and set on the model's `RotaryEmbedding`).
- Gemma's RMSNorm scaling by (1 + w) is `stepwise.models.rms_norm.ZeroCenteredRMSNorm` (the local
  layer spec); Transformer Engine's norms do the same under `layernorm_zero_centered_gamma`.
- `scale_embedding_output`: multiplies the embedding output by sqrt(hidden) rounded to the model dtype.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"silu": F.silu, "gelu_tanh": gelu_tanh}


def llama3_inv_freq(head_dim: int, theta: float, scaling: dict) -> torch.Tensor:
    """fp32 [head_dim / 2]: base frequencies theta^(-2j/d); long wavelengths divided by `factor`, short
    ones kept, and those in between blended linearly in (context / wavelength)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    base = 1.0 / (theta ** exponents)
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / base
    scaled = torch.where(wavelength > context / low, base / factor, base)
    blend = (context / wavelength - low) / (high - low)
    blended = (1 - blend) * scaled / factor + blend * scaled
    between = ~(wavelength < context / high) * ~(wavelength > context / low)
    return torch.where(between, blended, scaled)


def set_rope_frequencies(model, arch) -> None:
    """Replace the rotary embedding's inverse frequencies when `arch.rope_scaling` asks for llama3."""
    rope_type = arch.rope_scaling.get("rope_type")
    if rope_type is None:
        return
    if rope_type != "llama3":
        raise NotImplementedError(f"rope_scaling {arch.rope_scaling} is not supported for {arch.family} yet")
    rotary = model.rotary_pos_emb
    rotary.inv_freq = llama3_inv_freq(arch.head_dim, arch.rope_theta, arch.rope_scaling).to(rotary.inv_freq.device)


def scale_embedding_output(model, hidden_size: int):
    """Multiply `model.embedding`'s output by sqrt(hidden_size) cast to the output dtype (fp32 first,
    as transformers does: the bf16 factor for 3072 is 55.5, not 55.43)."""
    factor = torch.tensor(hidden_size**0.5)

    def scale(module, inputs, output):
        return output * factor.to(device=output.device, dtype=output.dtype)

    return model.embedding.register_forward_hook(scale)

"""Model FLOPs of a training step and model FLOPs utilisation (MFU) against a GPU's dense bf16 peak.

Per token, a forward pass multiplies every matmul weight once (2 FLOPs per weight: the QKV, output,
gate/up/down projections of each layer and the output layer, tied or not; the embedding lookup is no
matmul) and attends: q.k and p.v over the tokens before it, 2 x 2 x head_dim x heads FLOPs per
attended token, s/2 of them on average under the causal mask (what fused kernels compute). Backward
costs twice the forward, so a training step is 3 x forward (recomputation not counted: "model" FLOPs).
"""
from __future__ import annotations

from stepwise.models.hf_config import ModelArch

# dense (no sparsity) bf16 tensor-core peaks in FLOP/s from NVIDIA's data sheets, matched against
# torch.cuda.get_device_name() in this order (the more specific names first)
BF16_PEAK_FLOPS = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("GH200", 989.4e12), ("H100", 989.4e12),
                   ("H200", 989.4e12), ("H800", 989.4e12), ("A100", 312e12), ("A800", 312e12),
                   ("L40S", 362.05e12), ("B200", 2250e12))


def matmul_weights(arch: ModelArch) -> int:
    """Weights that multiply each token: per layer q (h x ad), k and v (h x kd each), the output
    projection (ad x h), gate, up and down (3hf); plus the output layer (V x h)."""
    h, q, kv = arch.hidden_size, arch.num_attention_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    return arch.num_layers * (h * (q + 2 * kv) + q * h + 3 * h * arch.ffn_hidden_size) + arch.vocab_size * h


def train_flops_per_token(arch: ModelArch, seq_len: int) -> float:
    """Model FLOPs of forward + backward per token of a causal sequence of `seq_len` tokens."""
    attention = arch.num_layers * 2 * 2 * arch.num_attention_heads * arch.head_dim * (seq_len / 2)
    return 3 * (2 * matmul_weights(arch) + attention)


def bf16_peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of the GPU called `device_name`, or None when not in the table."""
    for fragment, peak in BF16_PEAK_FLOPS:
        if fragment in device_name:
            return peak
    return None


def mfu(tokens_per_s: float, arch: ModelArch, seq_len: int, peak_flops: float) -> float:
    """Achieved model FLOP/s over `peak_flops`."""
    return tokens_per_s * train_flops_per_token(arch, seq_len) / peak_flops

"""Tolerances for comparing two fp32 evaluations of the same network that differ only in the order of
their floating-point sums: TP and PP layouts (the row-parallel all-reduce splits each sum over the
hidden size), micro-batching and data parallelism (the batch sum is regrouped), and transformers'
kernels against megatron's (another summation order, another but equivalent formula for RoPE and
RMSNorm). The bound is derived from the arithmetic, not from one machine's observation:

- Higham, *Accuracy and Stability of Numerical Algorithms*, Thm 3.5 / eq. 3.5: an fp32 sum of `n`
  products is within gamma_n * sum|x_i y_i| of the exact value, gamma_n = n*u / (1 - n*u), with the
  unit roundoff u = 2**-24. Two summation orders of the same sum therefore differ by at most
  2 * gamma_n * sum|x_i y_i|: the bound holds for any order, whatever the kernel or the CPU.
- A pre-norm decoder layer applies REDUCTIONS_PER_LAYER such reductions in sequence (two RMSNorm
  mean-squares, QKV, q.k, the softmax denominator, p.v, the output projection, gate/up, down), the
  model two more (final norm, output layer). To first order the relative errors of a chain add up,
  so an output of magnitude `scale` is off by at most 2 * gamma_n * depth * scale, with n the longest
  sum of the chain (max of hidden size, MLP width, sequence length).
- The worst-case gamma_n is linear in n; rounding errors of real sums grow like sqrt(n) (Higham
  section 2.8), so the bound already holds a slack of about sqrt(n) (10-20x for these models) over
  the typical difference. That slack is what covers the condition of the layers (softmax and
  RMSNorm amplify relative errors by small factors); each test prints observed vs bound.
- Transcendentals (exp, rsqrt, sin/cos in RoPE) are correctly rounded to a few ulps: they add
  O(u) per layer, negligible against gamma_n with n >= 24.

A mapping bug (a transposed, swapped or dropped tensor, a wrong RoPE base) changes logits by O(1) of
their scale: `tests/integration/test_family_conversion.py` checks that such bugs exceed the bound by
orders of magnitude.
"""
from __future__ import annotations

import torch

UNIT_ROUNDOFF = 2.0**-24  # fp32
REDUCTIONS_PER_LAYER = 9  # 2 norms, QKV, q.k, softmax sum, p.v, output projection, gate/up, down
MODEL_REDUCTIONS = 2  # final norm, output layer


def gamma(n: int) -> float:
    """Higham's gamma_n: the relative error bound of an fp32 sum of n products."""
    return n * UNIT_ROUNDOFF / (1 - n * UNIT_ROUNDOFF)


def reorder_bound(scale: float, longest_sum: int, depth: int) -> float:
    """The most two summation orders of a chain of `depth` sums (the longest `longest_sum` terms) can
    differ by, for an output of magnitude `scale`."""
    return 2 * gamma(longest_sum) * depth * scale


def decoder_depth(layers: int) -> int:
    return REDUCTIONS_PER_LAYER * layers + MODEL_REDUCTIONS


def logits_bound(reference: torch.Tensor, config: dict) -> float:
    """Bound on |logits - reference| for a decoder with HF `config`; `reference` is [..., seq, vocab]."""
    return output_bound(float(reference.abs().max()), config, reference.shape[-2])


def output_bound(scale: float, config: dict, seq_len: int) -> float:
    """Bound on an output of magnitude `scale` of a decoder with HF `config` over `seq_len` tokens."""
    longest = max(config["hidden_size"], config["intermediate_size"], seq_len)
    return reorder_bound(scale, longest, decoder_depth(config["num_hidden_layers"]))


def gradient_bound(scale: float, config: dict, batch_tokens: int) -> float:
    """Bound on a gradient regrouped over micro-batches / DP ranks: the backward pass runs the forward
    chain again in reverse (twice the depth) and each weight gradient sums over all `batch_tokens`."""
    longest = max(config["hidden_size"], config["intermediate_size"], batch_tokens)
    return reorder_bound(scale, longest, 2 * decoder_depth(config["num_hidden_layers"]))


def within(name: str, observed: float, bound: float) -> None:
    """Assert observed < bound, printing both (pytest -s shows what this machine gave)."""
    margin = f"{bound / observed:.0f}x margin" if observed else "exact"
    line = f"[tolerance] {name}: observed {observed:.3e}, bound {bound:.3e} ({margin})"
    print(line)
    assert observed < bound, line


# bf16 and FP8 (GPU tests). bf16 keeps 8 significant bits: storing a value rounds it by at most
# UNIT_ROUNDOFF_BF16 relative. GEMMs accumulate in fp32, so gamma_n above is negligible next to it.
UNIT_ROUNDOFF_BF16 = 2.0**-8
UNIT_ROUNDOFF_E4M3 = 2.0**-4  # FP8 E4M3 (the forward format of the `hybrid` recipe): 3 mantissa bits


def bf16_implementations_bound(scale: float, config: dict) -> float:
    """Bound on |a - b| between two bf16 implementations of the same decoder (Transformer Engine's fused
    kernels vs megatron's local modules) for outputs of magnitude `scale`: each of the chain's
    `decoder_depth` reductions stores its result in bf16 on both sides, at different points (TE rounds a
    fused norm + linear once where the local spec rounds twice), a relative error of at most
    UNIT_ROUNDOFF_BF16 per side; to first order the chain's errors add, as in `reorder_bound`."""
    return 2 * UNIT_ROUNDOFF_BF16 * decoder_depth(config["num_hidden_layers"]) * scale


def fp8_loss_bound(loss: float) -> float:
    """Bound on |FP8 loss - bf16 loss| of one forward pass on the same weights and batch: one E4M3
    rounding of the loss itself. Each FP8 GEMM input is rounded by at most UNIT_ROUNDOFF_E4M3 relative,
    but the rounding errors are zero-mean and independent, so they average out over each GEMM's
    n-term sums and again over the loss's mean over tokens; a worst-case chain bound (as for bf16)
    would exceed the loss itself and test nothing. A broken FP8 path (scales never set, amax lost, a
    recipe mix-up) moves the loss by O(1) or to NaN, far outside."""
    return UNIT_ROUNDOFF_E4M3 * abs(loss)

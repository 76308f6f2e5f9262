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

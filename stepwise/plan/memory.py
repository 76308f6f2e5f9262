"""Memory formulas for one network at one layout, in bytes: megatron's accounting for parameters and
optimizer state, Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
Models") for activations, adapted to the decoders stepwise builds (`stepwise.models.builder`): grouped
KV heads, a gated MLP, RMSNorm, no biases but Qwen2's q/k/v ones, no dropout.

Notation: h hidden size, a attention heads, k KV heads, d head dim, f MLP width, L layers, V the
vocabulary padded as megatron pads it, s sequence length, b rows per micro-batch, t TP, p PP.
"""
from __future__ import annotations

import math

from stepwise.models.hf_config import ModelArch
from stepwise.plan.defaults import ADAM_BYTES, DTYPE_BYTES, GRADIENT_BYTES, MASTER_BYTES

LOGITS = "logits"  # a vocabulary projection (policies)
VALUE = "value"  # a scalar value head (critics, value networks)


def layer_parameters(arch: ModelArch) -> int:
    """One decoder layer: q (h x ad), k and v (h x kd each), the output projection (ad x h), q/k/v biases
    when the family has them, gate/up/down of the gated MLP (3hf) and two RMSNorm weights (2h)."""
    q, kv, h = arch.num_attention_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim, arch.hidden_size
    attention = h * (q + 2 * kv) + q * h + ((q + 2 * kv) if arch.qkv_bias else 0)
    return attention + 3 * h * arch.ffn_hidden_size + 2 * h


def padded_vocab(vocab_size: int, divisible_by: int, tp: int) -> int:
    """megatron pads the vocabulary to a multiple of `make_vocab_size_divisible_by` x TP."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def layers_per_stage(arch: ModelArch, pp: int) -> int:
    """Layers on each pipeline stage (megatron splits them evenly; the recipe check makes PP divide L)."""
    return math.ceil(arch.num_layers / pp)


def stage_parameters(arch: ModelArch, outputs: tuple[str, ...], vocab: int, pp: int, rank: int) -> int:
    """Parameters of pipeline stage `rank` before the TP split: its layers, the word embedding (V x h)
    on the first stage and, on the last, the final norm (h) with each output. A vocabulary projection
    is another V x h unless the embedding is tied and there is one stage (with PP > 1 megatron keeps a
    copy of a tied embedding on the last stage); a value head is h weights and a bias."""
    first, last = rank == 0, rank == pp - 1
    total = layers_per_stage(arch, pp) * layer_parameters(arch)
    if first:
        total += vocab * arch.hidden_size
    if last:
        total += arch.hidden_size
        if LOGITS in outputs and not (arch.tie_word_embeddings and pp == 1):
            total += vocab * arch.hidden_size
        if VALUE in outputs:
            total += arch.hidden_size + 1
    return total


def bytes_per_parameter(dtype: str, distributed_optimizer: bool, dp: int) -> tuple[float, float, float]:
    """(weights, gradients, optimizer state) bytes per parameter on one GPU. bf16: 2 + 4 + (4 + 8) = 18,
    or 2 + 4 + 12/DP = 6 + 12/DP when the distributed optimizer shards master weights and Adam's
    moments over the data-parallel ranks; fp32 training keeps no master copy (4 + 4 + 8)."""
    optimizer = (0 if dtype == "float32" else MASTER_BYTES) + ADAM_BYTES
    return float(DTYPE_BYTES[dtype]), float(GRADIENT_BYTES), optimizer / (dp if distributed_optimizer else 1)


def layer_activation_bytes(arch: ModelArch, seq: int, rows: int, dtype: str, tp: int, sequence_parallel: bool,
                           recompute: bool) -> float:
    """Activations one layer keeps for its backward pass, per micro-batch, on one GPU.

    Korthikanti's table 1 counts 34sbh + 5as^2b bytes (2-byte values) for a GPT layer: 11sbh + 5as^2b in
    attention, 19sbh in the MLP, 4sbh for the two layer norms. Counted in values instead of bytes, for
    our layers:
      - the two norm inputs (2sbh) and the inputs of the QKV and first MLP projections (sbh each): 4sbh,
        full on every TP rank unless sequence parallelism splits them over t;
      - q and k for the scores (sbad + sbkd), v (sbkd), the output projection's input (sbad):
        2sb(ad + kd), split over t (heads are);
      - the gated MLP keeps the first projection's output, gate and up (2sbf), and the second's input
        (sbf): 3sbf, split over t (GPT: 4h GeLU input + 4h output = 8sbh of Korthikanti's 19);
      - the softmax of the scores, as^2b, split over t; selective recompute drops it (megatron recomputes
        core attention), and dropout's mask and output (Korthikanti's other 3as^2b bytes) do not exist.
    Times the bytes of the training dtype. GPT's layer (k = a, ad = h, a plain 4h MLP keeping 2sbf
    instead of 3sbf, two 1-byte dropout masks) gives back Korthikanti's 34sbh, and without sequence
    parallelism his 10sbh + 24sbh/t; Qwen2.5-72B's layer keeps 34.2sbh.
    """
    h, f = arch.hidden_size, arch.ffn_hidden_size
    ad, kd = arch.num_attention_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    tokens = seq * rows
    replicated = 4 * tokens * h / (tp if sequence_parallel else 1)
    scores = 0 if recompute else arch.num_attention_heads * seq * seq * rows
    split = (2 * tokens * (ad + kd) + 3 * tokens * f + scores) / tp
    return (replicated + split) * DTYPE_BYTES[dtype]


def output_activation_bytes(arch: ModelArch, outputs: tuple[str, ...], vocab: int, seq: int, rows: int, dtype: str,
                            tp: int, sequence_parallel: bool) -> float:
    """The last stage's head, per micro-batch, on one GPU: the final norm's input and output (2sbh, split
    over t by sequence parallelism); logits (sbV/t in the training dtype) with the fp32 copy and the
    masked fp32 clone the log-prob loss makes (`stepwise.train.logprobs`; the clone becomes the softmax
    kept for backward), 8sbV/t bytes more; a value head reads the full sequence on every TP rank (sbh)."""
    tokens, width = seq * rows, DTYPE_BYTES[dtype]
    total = 2 * tokens * arch.hidden_size * width / (tp if sequence_parallel else 1)
    if LOGITS in outputs:
        total += tokens * vocab * (width + 8) / tp
    if VALUE in outputs:
        total += tokens * arch.hidden_size * width
    return total


def in_flight_microbatches(pp: int, rank: int, microbatches: int) -> int:
    """Micro-batches whose activations stage `rank` holds at once under 1F1B: p - rank (the first stage
    warms up with p forward passes before its first backward), never more than there are."""
    return max(1, min(pp - rank, microbatches))


def bubble_fraction(pp: int, microbatches: int) -> float:
    """Idle fraction of a 1F1B step, (p - 1) / m (Narayanan et al. 2021)."""
    return (pp - 1) / microbatches


def kv_cache_bytes_per_token(arch: ModelArch, dtype: str) -> int:
    """K and v of every layer: 2 x layers x KV heads x head dim x dtype bytes."""
    return 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * DTYPE_BYTES[dtype]


def model_parameters(arch: ModelArch, outputs: tuple[str, ...], vocab: int) -> int:
    """The whole network (one pipeline stage holding everything)."""
    return stage_parameters(arch, outputs, vocab, pp=1, rank=0)


def checkpoint_bytes(parameters: int, dtype: str) -> int:
    """A training checkpoint: weights in the recipe dtype, the fp32 master copy (half precision only)
    and Adam's m and v."""
    return parameters * (DTYPE_BYTES[dtype] + (0 if dtype == "float32" else MASTER_BYTES) + ADAM_BYTES)

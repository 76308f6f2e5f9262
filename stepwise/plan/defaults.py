"""Every assumption the planner makes about the hardware and the run, in one place.

Memory is counted in GiB (2**30 bytes): an "80 GB" A100 or H100 reports 80 GiB (81,920 MiB) or a little
less (81,559 MiB), which the headroom below absorbs.
"""
from __future__ import annotations

GIB = 2**30

GPU_MEMORY_GIB = 80.0  # `stepwise plan --gpu-mem`; `stepwise run` checks against this

# What a training or scoring process cannot give to tensors the formulas count. A CUDA context with
# cuBLAS/cuDNN workspaces takes 0.5-1 GiB and each NCCL communicator (TP, PP, DP, embedding groups)
# some hundreds of MiB of buffers: 2 GiB together. PyTorch's caching allocator then loses 5-10% of
# what it holds to fragmentation, and the formulas leave out small transients (rotary tables, attention
# masks, gradient-norm buffers, the last all-reduce bucket): 10% of the GPU covers both.
CUDA_RESERVE_GIB = 2.0
FRAGMENTATION_FRACTION = 0.10

# A from-scratch model (`model.hf_config` without `vocab_size`) takes the vocabulary of the tokenizer
# its run trains: one id per distinct character of the task's texts plus three specials (32 for the
# arithmetic task). Planned at this bound when `tokenizer.vocab_size` does not say.
TRAINED_TOKENIZER_VOCAB = 1024

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GRADIENT_BYTES = 4  # megatron accumulates and reduces gradients in an fp32 buffer (main_grad)
MASTER_BYTES = 4  # fp32 master copy of half-precision weights (none when training in fp32)
ADAM_BYTES = 8  # Adam's first and second moments, fp32


def usable_gib(gpu_memory_gib: float) -> float:
    """What a megatron process may fill on a GPU of `gpu_memory_gib`."""
    return gpu_memory_gib * (1.0 - FRAGMENTATION_FRACTION) - CUDA_RESERVE_GIB

"""Process groups (NCCL on GPU, gloo on CPU), megatron parallel state, the CPU shim, rank-symmetric checks."""

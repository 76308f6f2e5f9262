"""Weight gradients summed straight into megatron DDP's fp32 `main_grad` buffer.

megatron's `gradient_accumulation_fusion`: a linear layer's backward adds input^T-by-gradient into
`weight.main_grad` with one GEMM (beta = 1) instead of making a gradient tensor that DDP's
post-backward hook then adds to `main_grad` (one pass less over every weight gradient, and no
gradient-sized tensor per weight). On GPU the GEMM is APEX's `fused_weight_gradient_mlp_cuda`; on the
CPU it is `accumulate` below (`cpu_shim` hands it to megatron's linear layers as that module). The
engine's own layers use it too: `weight_gradient` for the lean linear layers and the SwiGLU fc1, and
the chunked output layer directly.

The contract with DDP (megatron-core 0.16's `LinearWithGradAccumulationAndAsyncCommunication`):
after adding, the layer sets `weight.grad_added_to_main_grad` and returns a dummy gradient, so DDP's
hook, which runs on the backward thread, does not add it again (`dummy_gradient`).
"""
from __future__ import annotations

import types

import torch


def accumulate(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """main_grad += grad_output^T @ total_input ([tokens, out] and [tokens, in] into [out, in]), summed in
    `main_grad`'s dtype (fp32 under DDP's `grad_reduce_in_fp32`, as APEX's kernel sums bf16 inputs)."""
    main_grad.addmm_(grad_output.t().to(main_grad.dtype), total_input.to(main_grad.dtype))


# megatron's `fused_weight_gradient_mlp_cuda` as the CPU provides it: the same call for an fp32 and a
# bf16/fp16 `main_grad` (addmm_ sums in the buffer's dtype either way)
CPU_KERNELS = types.SimpleNamespace(wgrad_gemm_accum_fp32=accumulate, wgrad_gemm_accum_fp16=accumulate)


def weight_gradient(weight: torch.Tensor, fusion: bool, total_input: torch.Tensor,
                    *row_block_grads: torch.Tensor) -> torch.Tensor | None:
    """What a linear layer's backward returns for `weight` ([out, in]) from its input [tokens, in] and the
    output gradients of its row blocks, in order (one [tokens, out] block for a plain layer; the gate
    and up halves for the SwiGLU fc1): grad^T @ input per block, added straight into `weight.main_grad`
    when `fusion` is on and the weight is DDP's (then the dummy gradient is returned), else written into
    a new gradient."""
    main_grad = getattr(weight, "main_grad", None) if fusion else None
    target = torch.empty_like(weight) if main_grad is None else main_grad
    for block, grad in zip(target.chunk(len(row_block_grads), dim=0), row_block_grads):
        if main_grad is None:
            torch.mm(grad.t(), total_input, out=block)
        else:
            accumulate(total_input, grad, block)
    return target if main_grad is None else dummy_gradient(weight, weight.dtype)


def dummy_gradient(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """The gradient a layer returns once it added the weight gradient to `weight.main_grad`: None without
    DDP's `grad_added_to_main_grad` flag; else the flag is set, so DDP's hook skips adding `param.grad`,
    and a dummy is returned (the hook runs on the backward thread): zeros where `zero_out_wgrad` says
    the parameter also gets a real gradient (a tied embedding at PP 1, which the hook then does add)."""
    if not hasattr(weight, "grad_added_to_main_grad"):
        return None
    weight.grad_added_to_main_grad = True
    if getattr(weight, "zero_out_wgrad", False):
        return torch.zeros(weight.shape, dtype=dtype, device=weight.device)
    return torch.empty(weight.shape, dtype=dtype, device=weight.device)

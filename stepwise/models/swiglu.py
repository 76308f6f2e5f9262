"""SwiGLU over megatron's fused fc1 output, keeping one tensor for backward and writing one gradient.

megatron's local MLP splits fc1's [..., 2f] output with `torch.chunk`; its backward makes three
f-wide tensors (the two products and SiLU's gradient) and concatenates them into a fourth, 2f-wide,
every layer. On a CPU each fresh large tensor costs its page faults as much as its arithmetic.
`SwiGLU` keeps what autograd kept (fc1's output and SiLU(gate)) and writes both halves' gradients
into one new [..., 2f] tensor in place, with torch's own kernels: forward and gradients are bitwise
megatron's.
megatron builds it as the MLP's `activation_func` submodule (its `use_te_activation_func` hook: the
module takes the whole fc1 output), in the local spec of SiLU-gated models.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fused: torch.Tensor) -> torch.Tensor:
        gate, up = fused.chunk(2, dim=-1)
        activated = F.silu(gate)
        ctx.save_for_backward(fused, activated)
        return activated * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        fused, activated = ctx.saved_tensors
        gate, up = fused.chunk(2, dim=-1)
        grad_fused = torch.empty_like(fused)  # the only new tensor: both halves are written in place
        grad_gate, grad_up = grad_fused.chunk(2, dim=-1)
        torch.mul(grad, activated, out=grad_up)
        torch.mul(grad, up, out=grad_gate)
        torch.ops.aten.silu_backward.grad_input(grad_gate, gate, grad_input=grad_gate)
        return grad_fused


def swiglu(fused: torch.Tensor) -> torch.Tensor:
    """SiLU(first half) * second half of `fused`'s last dimension."""
    return _SwiGLUFunction.apply(fused)


class SwiGLU(MegatronModule):
    """The MLP activation module megatron builds with `config=` (`MLPSubmodules.activation_func`); a
    MegatronModule, so the MLP's sharded state dict walks it (it holds no state)."""

    def __init__(self, config):
        super().__init__(config=config)

    def forward(self, fused: torch.Tensor) -> torch.Tensor:
        return swiglu(fused)

"""SwiGLU for the local spec: fc1 and the SiLU gate as one step over contiguous halves, or (under
sequence parallelism) the gate alone over megatron's fused fc1 output.

megatron's local MLP computes fc1 as one [..., 2f] output and splits it with `torch.chunk`: SiLU, its
gradient and the products then run over strided halves (measured on CPU: 1.5-1.9x the time of the
same ops over contiguous tensors), and the backward concatenates the halves' gradients into a 2f-wide
tensor for fc1's backward.

`SwiGLULinear` (the spec's `linear_fc1`) computes the gate and up projections as two products with the
weight's two row blocks (the same parameter, shape and checkpoint keys as megatron's fc1: [gate; up]
rows of this TP rank), so every elementwise op, forward and backward, runs over contiguous tensors, and
fc1's input and weight gradients are two products each (the weight's written into its halves in
place, or added into DDP's `main_grad` halves under megatron's gradient accumulation fusion). It returns
SiLU(gate) * up, and the spec's activation is then `AlreadyActivated`. It keeps for backward what
megatron's fc1 and chunked SwiGLU keep: fc1's input, gate and up, SiLU(gate).
Under TP its input gradient is all-reduced (megatron's `copy_to_tensor_model_parallel_region`).

Under sequence parallelism megatron's fc1 gathers its input in forward and again in backward, keeping
only this rank's shard; `SwiGLU` is then the activation over its output: one [..., 2f] gradient
written in place instead of three f-wide tensors concatenated.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, copy_to_tensor_model_parallel_region
from megatron.core.transformer.module import MegatronModule

from stepwise.parallel.wgrad import weight_gradient


def _gate_grads(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activated: torch.Tensor,
                grad_gate: torch.Tensor, grad_up: torch.Tensor) -> None:
    """Gradients of SiLU(gate) * up into `grad_gate` and `grad_up` (written in place)."""
    torch.mul(grad, activated, out=grad_up)
    torch.mul(grad, up, out=grad_gate)
    torch.ops.aten.silu_backward.grad_input(grad_gate, gate, grad_input=grad_gate)


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
        grad_fused = torch.empty_like(fused)  # the only new tensor: both halves are written in place
        _gate_grads(grad, *fused.chunk(2, dim=-1), activated, *grad_fused.chunk(2, dim=-1))
        return grad_fused


def swiglu(fused: torch.Tensor) -> torch.Tensor:
    """SiLU(first half) * second half of `fused`'s last dimension."""
    return _SwiGLUFunction.apply(fused)


class _SwiGLULinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, fusion: bool) -> torch.Tensor:
        flat = hidden.reshape(-1, hidden.shape[-1])
        gate_rows, up_rows = weight.chunk(2, dim=0)
        gate, up = flat @ gate_rows.t(), flat @ up_rows.t()
        activated = F.silu(gate)
        ctx.save_for_backward(flat, weight, gate, up, activated)
        ctx.input_shape, ctx.fusion = hidden.shape, fusion
        return (activated * up).view(*hidden.shape[:-1], gate.shape[-1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        flat, weight, gate, up, activated = ctx.saved_tensors
        gate_rows, up_rows = weight.chunk(2, dim=0)
        grad = grad.reshape(gate.shape)
        grad_gate, grad_up = torch.empty_like(gate), torch.empty_like(up)
        _gate_grads(grad, gate, up, activated, grad_gate, grad_up)
        grad_hidden = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_hidden = (grad_gate @ gate_rows).addmm_(grad_up, up_rows).view(ctx.input_shape)
        if ctx.needs_input_grad[1]:  # the gate and up row blocks, written or added into main_grad
            grad_weight = weight_gradient(weight, ctx.fusion, flat, grad_gate, grad_up)
        return grad_hidden, grad_weight, None


def swiglu_linear(hidden: torch.Tensor, weight: torch.Tensor, fusion: bool = False) -> torch.Tensor:
    """SiLU(hidden @ gate_rows.T) * (hidden @ up_rows.T), `weight` = [gate_rows; up_rows]; with `fusion`
    (megatron's `gradient_accumulation_fusion`) the weight gradient goes into `weight.main_grad` when
    the weight has one (`stepwise.parallel.wgrad`)."""
    return _SwiGLULinearFunction.apply(hidden, weight, fusion)


class SwiGLULinear(ColumnParallelLinear):
    """megatron's fc1 (`ColumnParallelLinear`: same weight, sharding and state) returning SiLU(gate) * up;
    not under sequence parallelism, without bias, output not gathered (see the module doc)."""

    def __init__(self, input_size, output_size, *, config, init_method, bias=True, gather_output=False, **kwargs):
        if bias or gather_output or config.sequence_parallel:
            raise ValueError("SwiGLULinear takes fc1 without bias, gathered output or sequence parallelism")
        super().__init__(input_size, output_size, config=config, init_method=init_method, bias=bias,
                         gather_output=gather_output, **kwargs)

    def forward(self, input_: torch.Tensor, weight: torch.Tensor | None = None, runtime_gather_output=None):
        if weight is not None or runtime_gather_output:
            raise ValueError("SwiGLULinear uses its own weight and does not gather its output")
        hidden = input_ if self.disable_grad_reduce else copy_to_tensor_model_parallel_region(input_, group=self.tp_group)
        return swiglu_linear(hidden, self.weight, self.gradient_accumulation_fusion), None


class SwiGLU(MegatronModule):
    """The MLP activation module megatron builds with `config=` (`MLPSubmodules.activation_func`; its
    `use_te_activation_func` hook: the module takes the whole fc1 output); a MegatronModule, so the MLP's
    sharded state dict walks it (it holds no state)."""

    def forward(self, fused: torch.Tensor) -> torch.Tensor:
        return swiglu(fused)


class AlreadyActivated(MegatronModule):
    """The MLP's activation after `SwiGLULinear`, which returns activated values: passes them on."""

    def forward(self, activated: torch.Tensor) -> torch.Tensor:
        return activated

"""megatron's tensor-parallel linear layers with a leaner forward and autograd function for the local spec.

megatron-core's linear layers spend Python on every call that a training step of the local spec does
not need: the forward's branches (weights passed in, expert communication, CPU offloading, deferred
embedding gradients), an identity autograd region at TP 1 on each side (`copy_to_...` before a column-
parallel layer, `reduce_from_...` after a row-parallel one: a Python autograd node each, forward and
backward), and in `LinearWithGradAccumulationAndAsyncCommunication` AMP decorators, an environment
lookup and the sequence-parallel branches; it also adds the bias as a second pass over the output.
Measured on the CPU, a one-token forward and backward of the QKV layer took 372 µs against 189 µs for
`torch.nn.Linear`; the engine's step is one such layer four times per transformer layer.

`LeanColumnParallelLinear` and `LeanRowParallelLinear` are megatron's layers (same parameters,
sharding, checkpoints and results) whose forward, in the plain case (no sequence parallelism or expert
communication, own trainable weight, output not gathered, no deferred embedding gradient or CPU
offloading), calls `_LinearFunction` directly, and megatron's own forward and function otherwise.
`_LinearFunction`:
- adds the bias in the GEMM itself (`addmm`);
- all-reduces the input gradient over TP asynchronously while the weight gradient is computed (what
  megatron's function does for a column-parallel layer without sequence parallelism);
- adds the weight gradient straight into DDP's `main_grad` under megatron's gradient accumulation
  fusion (`stepwise.parallel.wgrad`), else returns it.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import (ColumnParallelLinear, RowParallelLinear,
                                           reduce_from_tensor_model_parallel_region)

from stepwise.parallel.wgrad import weight_gradient


class _LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input_, weight, bias, fusion: bool, dgrad_group):
        flat = input_.reshape(-1, input_.shape[-1])
        out = flat @ weight.t() if bias is None else torch.addmm(bias, flat, weight.t())
        ctx.save_for_backward(flat, weight)
        ctx.input_shape, ctx.fusion, ctx.dgrad_group, ctx.has_bias = input_.shape, fusion, dgrad_group, bias is not None
        return out.view(*input_.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        flat, weight = ctx.saved_tensors
        grad = grad.reshape(-1, grad.shape[-1])
        grad_input = grad_weight = grad_bias = handle = None
        if ctx.needs_input_grad[0]:
            grad_input = grad @ weight
            if ctx.dgrad_group is not None:  # overlaps the weight gradient's product below
                handle = dist.all_reduce(grad_input, group=ctx.dgrad_group, async_op=True)
        if ctx.needs_input_grad[1]:
            grad_weight = weight_gradient(weight, ctx.fusion, flat, grad)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum(dim=0)
        if handle is not None:
            handle.wait()
        if grad_input is not None:
            grad_input = grad_input.view(ctx.input_shape)
        return grad_input, grad_weight, grad_bias, None, None


def _plain(layer, weight_requires_grad: bool) -> bool:
    """Whether `layer` takes the lean forward on this call (see the module doc)."""
    offloading = layer.config._cpu_offloading_context
    return (weight_requires_grad and not layer.sequence_parallel and not layer.explicit_expert_comm
            and not layer.config.defer_embedding_wgrad_compute
            and (offloading is None or not offloading.inside_context))


class LeanColumnParallelLinear(ColumnParallelLinear):
    """megatron's `ColumnParallelLinear` with a lean forward (see the module doc)."""

    def forward(self, input_, weight=None, runtime_gather_output=None):
        gather = self.gather_output if runtime_gather_output is None else runtime_gather_output
        if weight is not None or gather or not _plain(self, self.weight.requires_grad):
            return super().forward(input_, weight, runtime_gather_output)
        # TP 1: megatron's copy_to region is the identity; TP > 1 without sequence parallelism: the
        # product all-reduces the input gradient (megatron's allreduce_dgrad)
        group = self.tp_group if self.allreduce_dgrad else None
        bias = None if self.skip_bias_add else self.bias
        output = _LinearFunction.apply(input_, self.weight, bias, self.gradient_accumulation_fusion, group)
        return output, (self.bias if self.skip_bias_add else None)


class LeanRowParallelLinear(RowParallelLinear):
    """megatron's `RowParallelLinear` with a lean forward (see the module doc)."""

    def forward(self, input_):
        if not self.input_is_parallel or not _plain(self, self.weight.requires_grad):
            return super().forward(input_)
        output = _LinearFunction.apply(input_, self.weight, None, self.gradient_accumulation_fusion, None)
        if self.tp_group.size() > 1:  # the identity at TP 1
            output = reduce_from_tensor_model_parallel_region(output, group=self.tp_group)
        if self.skip_bias_add:
            return output, self.bias
        return (output if self.bias is None else output + self.bias), None

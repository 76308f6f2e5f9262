"""The local spec's lean pieces equal what they replace: the linear layers against megatron's own (values,
every gradient, the weight gradient added into DDP's main_grad under gradient accumulation fusion), the
hand-written RMSNorm against torch's and Gemma's (1 + w) form, and the CPU shim's foreach gradient norm
and clipping against megatron's per-tensor loops."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch


def _layers(bias: bool):
    """(ours, megatron's) column- and row-parallel layers of one config, same weights, float64."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from stepwise.models.builder import EngineOptions, transformer_config
    from stepwise.models.hf_config import arch_from_hf_dict
    from stepwise.models.lean_linear import LeanColumnParallelLinear, LeanRowParallelLinear
    from stepwise.parallel.runtime import init_parallel

    init_parallel(1, 1, seed=3)
    arch = arch_from_hf_dict(dict(model_type="qwen2", vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1, intermediate_size=24))
    config = transformer_config(arch, EngineOptions(transformer_impl="local", dtype="float32"))
    init = torch.nn.init.normal_
    pairs = []
    for ours, theirs, extra in ((LeanColumnParallelLinear, ColumnParallelLinear, {"gather_output": False}),
                                (LeanRowParallelLinear, RowParallelLinear, {"input_is_parallel": True,
                                                                            "skip_bias_add": False})):
        built = [cls(16, 24, config=config, init_method=init, bias=bias, **extra).double() for cls in (ours, theirs)]
        built[1].load_state_dict(built[0].state_dict())
        pairs.append(built)
    return pairs


def _run(layer, hidden, grad):
    given = hidden.clone().requires_grad_()
    out, out_bias = layer(given)
    out.backward(grad)
    bias_grad = None if layer.bias is None else layer.bias.grad
    return out, out_bias, given.grad, layer.weight.grad, bias_grad


@pytest.mark.parametrize("bias", [True, False])
def test_lean_linear_layers_equal_megatron_s(bias):
    for ours, theirs in _layers(bias):
        hidden = torch.randn(5, 3, ours.weight.shape[1], dtype=torch.float64)
        grad = torch.randn(5, 3, ours.weight.shape[0], dtype=torch.float64)
        for mine, reference in zip(_run(ours, hidden, grad), _run(theirs, hidden, grad)):
            if reference is None:
                assert mine is None
            else:
                torch.testing.assert_close(mine, reference, rtol=1e-12, atol=1e-13)


def test_lean_linear_adds_the_weight_gradient_into_main_grad_under_fusion():
    """With gradient accumulation fusion and DDP's attributes, the weight gradient lands in main_grad on
    top of what it held, DDP's flag is set and a dummy gradient returned (zeros under zero_out_wgrad)."""
    for ours, theirs in _layers(bias=True):
        hidden = torch.randn(4, 2, ours.weight.shape[1], dtype=torch.float64)
        grad = torch.randn(4, 2, ours.weight.shape[0], dtype=torch.float64)
        expected = _run(theirs, hidden, grad)[3]
        for zero_out in (False, True):
            earlier = torch.randn(ours.weight.shape, dtype=torch.float64)
            ours.gradient_accumulation_fusion = True
            ours.weight.main_grad, ours.weight.grad_added_to_main_grad = earlier.clone(), False
            ours.weight.zero_out_wgrad = zero_out
            ours.weight.grad = None
            _run(ours, hidden, grad)
            torch.testing.assert_close(ours.weight.main_grad, earlier + expected, rtol=1e-12, atol=1e-12)
            assert ours.weight.grad_added_to_main_grad is True
            assert ours.weight.grad.shape == ours.weight.shape
            if zero_out:
                assert not ours.weight.grad.any()


def test_cpu_wgrad_kernel_sums_into_main_grad():
    from stepwise.parallel.wgrad import CPU_KERNELS

    total_input, grad_output = torch.randn(6, 4), torch.randn(6, 3)
    main_grad = torch.randn(3, 4)
    expected = main_grad + grad_output.t() @ total_input
    CPU_KERNELS.wgrad_gemm_accum_fp32(total_input, grad_output, main_grad)
    torch.testing.assert_close(main_grad, expected)
    bf16_main = torch.zeros(3, 4)
    CPU_KERNELS.wgrad_gemm_accum_fp16(total_input.bfloat16(), grad_output.bfloat16(), bf16_main)
    torch.testing.assert_close(bf16_main, grad_output.bfloat16().float().t() @ total_input.bfloat16().float())


def _norm_pair(cls, dtype):
    config = SimpleNamespace(params_dtype=dtype, sequence_parallel=False)
    norm = cls(config, 32, eps=1e-6)
    norm.weight.data.normal_(0.0 if norm.zero_centered else 1.0, 0.2)
    return norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rms_norm_equals_torch_s(dtype):
    from stepwise.models.rms_norm import RMSNorm

    ours = _norm_pair(RMSNorm, dtype)
    theirs = torch.nn.RMSNorm(32, eps=1e-6, dtype=dtype)
    theirs.weight.data.copy_(ours.weight.data)
    hidden = torch.randn(6, 3, 32, dtype=dtype) * 3
    grad = torch.randn(6, 3, 32, dtype=dtype)
    results = []
    for norm in (ours, theirs):
        given = hidden.clone().requires_grad_()
        out = norm(given)
        results.append((out, *torch.autograd.grad(out, (given, norm.weight), grad)))
    assert torch.equal(results[0][0], results[1][0]), "the forward is torch's arithmetic in torch's order"
    eps = torch.finfo(dtype).eps
    for mine, reference in zip(results[0][1:], results[1][1:]):
        # a gradient element sums 32 products of O(|grad| * |w|) terms: 64 ulps of its scale
        torch.testing.assert_close(mine, reference, rtol=0, atol=64 * eps * float(reference.abs().max()))


def test_zero_centered_rms_norm_is_gemma_s_form_and_gradients():
    from stepwise.models.rms_norm import ZeroCenteredRMSNorm

    norm = _norm_pair(ZeroCenteredRMSNorm, torch.float64)
    hidden = torch.randn(5, 2, 32, dtype=torch.float64, requires_grad=True)
    out = norm(hidden)
    upcast = hidden.float()  # Gemma's norm upcasts to fp32 with .float(), even from fp64
    gemma = ((upcast * torch.rsqrt(upcast.pow(2).mean(-1, keepdim=True) + 1e-6)) * (1.0 + norm.weight.float()))
    assert torch.equal(out, gemma.type_as(hidden))
    grad = torch.randn_like(out)
    mine = torch.autograd.grad(out, (hidden, norm.weight), grad)
    reference = torch.autograd.grad(gemma.type_as(hidden), (hidden, norm.weight), grad)
    for a, b in zip(mine, reference):
        torch.testing.assert_close(a, b, rtol=0, atol=64 * torch.finfo(torch.float32).eps * float(b.abs().max()))


def test_foreach_norm_and_clip_equal_megatron_s_loops():
    from megatron.core.utils import local_multi_tensor_l2_norm

    from stepwise.parallel.cpu_shim import clip_grad_by_total_norm_cpu, foreach_l2_norm

    grads = [torch.randn(shape) for shape in ((30, 7), (5,), (16, 16), (1,))]
    theirs = local_multi_tensor_l2_norm(0, None, [grads], False)[0]
    ours = foreach_l2_norm(0, None, [grads], False)[0]
    assert ours.shape == (1,) and torch.equal(ours, theirs)
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for param, grad in zip(params, grads):
        param.grad = grad.clone()
    params.append(torch.nn.Parameter(torch.zeros(2)))  # no gradient: left alone
    total = float(theirs)
    clip_grad_by_total_norm_cpu(params, max_norm=1.0, total_norm=total)
    for param, grad in zip(params, grads):
        assert torch.equal(param.grad, grad * (1.0 / (total + 1.0e-6)))
    assert params[-1].grad is None
    clip_grad_by_total_norm_cpu(params[:1], max_norm=1e9, total_norm=total)  # under the limit: unchanged
    assert torch.equal(params[0].grad, grads[0] * (1.0 / (total + 1.0e-6)))

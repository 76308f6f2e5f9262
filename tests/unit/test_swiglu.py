"""The local spec's SwiGLU: fc1 and the gate over contiguous halves (`SwiGLULinear`) and the gate alone
over a fused fc1 output (sequence parallelism): megatron's arithmetic, what it keeps for backward."""
import pytest
import torch
import torch.nn.functional as F

from stepwise.models.swiglu import swiglu, swiglu_linear


def chunked(fused):
    gate, up = torch.chunk(fused, 2, dim=-1)
    return F.silu(gate) * up


def saved_elements(function, fused) -> int:
    """Elements autograd keeps for backward while `function(fused)` runs (each distinct storage once)."""
    kept = {}

    def pack(tensor):
        kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes() // tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        function(fused)
    return sum(kept.values())


def test_swiglu_equals_the_chunked_form_bitwise_with_gradients():
    generator = torch.Generator().manual_seed(0)
    fused = torch.randn(7, 3, 2 * 48, generator=generator)
    grad = torch.randn(7, 3, 48, generator=generator)
    ours = fused.clone().requires_grad_()
    theirs = fused.clone().requires_grad_()
    out, reference = swiglu(ours), chunked(theirs)
    out.backward(grad)
    reference.backward(grad)
    assert torch.equal(out, reference)
    assert torch.equal(ours.grad, theirs.grad)
    assert ours.grad.is_contiguous()


def test_swiglu_keeps_what_the_chunked_form_keeps():
    fused = torch.randn(5, 2, 2 * 32, requires_grad=True)
    assert saved_elements(chunked, fused) == fused.numel() + fused.numel() // 2  # gate, up (views) + SiLU(gate)
    assert saved_elements(swiglu, fused) == saved_elements(chunked, fused)


def megatron_fc1_swiglu(hidden, weight):
    """megatron's local form: one fc1 product over the fused weight, then the chunked gate."""
    return chunked(hidden @ weight.t())


def test_swiglu_linear_equals_megatron_s_fc1_and_gate_with_gradients():
    """float64, so the only difference is the order of sums in the split products (~1e-16 relative)."""
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(6, 3, 16, generator=generator, dtype=torch.float64)
    weight = torch.randn(2 * 24, 16, generator=generator, dtype=torch.float64)
    grad = torch.randn(6, 3, 24, generator=generator, dtype=torch.float64)
    ours, theirs = [(hidden.clone().requires_grad_(), weight.clone().requires_grad_()) for _ in range(2)]
    out, reference = swiglu_linear(*ours), megatron_fc1_swiglu(*theirs)
    out.backward(grad)
    reference.backward(grad)
    assert out.shape == (6, 3, 24)
    torch.testing.assert_close(out, reference, rtol=1e-12, atol=0)
    for mine, megatron in zip(ours, theirs):
        torch.testing.assert_close(mine.grad, megatron.grad, rtol=1e-12, atol=1e-13)
        assert mine.grad.is_contiguous()
    with pytest.raises(AssertionError):  # the gate is the first half of the rows, not the second
        torch.testing.assert_close(out, megatron_fc1_swiglu(hidden, weight.roll(24, dims=0)), rtol=1e-6, atol=0)


def test_swiglu_linear_with_a_frozen_weight_makes_no_weight_gradient():
    hidden = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(12, 8)
    swiglu_linear(hidden, weight).sum().backward()
    assert hidden.grad is not None and weight.grad is None


def test_swiglu_linear_keeps_what_megatron_s_fc1_and_gate_keep():
    hidden = torch.randn(5, 2, 16, requires_grad=True)
    weight = torch.randn(2 * 32, 16, requires_grad=True)
    kept = saved_elements(lambda w: swiglu_linear(hidden, w), weight)
    assert kept == hidden.numel() + weight.numel() + 3 * 10 * 32  # input, weight, gate, up, SiLU(gate)
    assert kept == saved_elements(lambda w: megatron_fc1_swiglu(hidden, w), weight)


def test_the_local_spec_builds_swiglu_for_silu_models_only():
    from stepwise.models.builder import EngineOptions, layer_spec, transformer_config
    from stepwise.models.hf_config import arch_from_hf_dict

    options = EngineOptions(transformer_impl="local")
    shape = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=64, head_dim=8)
    qwen = transformer_config(arch_from_hf_dict(dict(model_type="qwen2", **shape)), options)
    mlp = layer_spec(options, qwen).submodules.mlp.submodules
    assert (mlp.linear_fc1.__name__, mlp.activation_func.__name__) == ("SwiGLULinear", "AlreadyActivated")
    qwen.sequence_parallel = True  # megatron's fc1 gathers the input shard again in backward: it keeps its own
    mlp = layer_spec(options, qwen).submodules.mlp.submodules
    assert (mlp.linear_fc1.__name__, mlp.activation_func.__name__) == ("LeanColumnParallelLinear", "SwiGLU")
    gemma = transformer_config(arch_from_hf_dict(dict(model_type="gemma", hidden_act="gelu_pytorch_tanh", **shape)),
                               options)
    assert not gemma.use_te_activation_func  # GeGLU keeps megatron's chunked form


def test_the_spec_s_mlp_equals_megatron_s_local_mlp():
    """Built from the spec with the same fc1/fc2 weights: outputs and every gradient as megatron's own
    MLP (fused fc1, chunked gate), float64."""
    from dataclasses import replace

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module

    from stepwise.models.builder import EngineOptions, layer_spec, transformer_config
    from stepwise.models.hf_config import arch_from_hf_dict
    from stepwise.parallel.runtime import init_parallel

    init_parallel(1, 1, seed=5)
    options = EngineOptions(transformer_impl="local", dtype="float32")
    arch = arch_from_hf_dict(dict(model_type="qwen2", vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=48))
    config = transformer_config(arch, options)
    ours = build_module(layer_spec(options, config).submodules.mlp, config=config).double()
    plain = replace(config, use_te_activation_func=False)
    megatron = build_module(get_gpt_layer_local_spec(normalization="RMSNorm").submodules.mlp, config=plain).double()
    megatron.load_state_dict(ours.state_dict())
    hidden = torch.randn(5, 2, 32, dtype=torch.float64)
    grad = torch.randn(5, 2, 32, dtype=torch.float64)
    outputs = []
    for mlp in (ours, megatron):
        given = hidden.clone().requires_grad_()
        out, bias = mlp(given)
        out.backward(grad)
        outputs.append((out, given.grad, mlp.linear_fc1.weight.grad, mlp.linear_fc2.weight.grad))
        assert bias is None
    assert type(ours.linear_fc1).__name__ == "SwiGLULinear"
    for mine, theirs in zip(*outputs):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-13)

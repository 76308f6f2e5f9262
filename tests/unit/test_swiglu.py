"""The SwiGLU activation module: megatron's chunked SiLU-gate arithmetic, with less kept for backward."""
import torch
import torch.nn.functional as F

from stepwise.models.swiglu import swiglu


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


def test_the_local_spec_builds_swiglu_for_silu_models_only():
    from stepwise.models.builder import EngineOptions, layer_spec, transformer_config
    from stepwise.models.hf_config import arch_from_hf_dict

    options = EngineOptions(transformer_impl="local")
    shape = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=64, head_dim=8)
    qwen = transformer_config(arch_from_hf_dict(dict(model_type="qwen2", **shape)), options)
    assert layer_spec(options, qwen).submodules.mlp.submodules.activation_func.__name__ == "SwiGLU"
    gemma = transformer_config(arch_from_hf_dict(dict(model_type="gemma", hidden_act="gelu_pytorch_tanh", **shape)),
                               options)
    assert not gemma.use_te_activation_func  # GeGLU keeps megatron's chunked form

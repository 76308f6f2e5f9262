"""Transformer Engine's layer spec read on CPU (TE absent): its TE modules, and the `_extra_state` objects a
converted checkpoint holds for them, keyed as megatron keys them for a model whose modules at those
paths checkpoint extra state (as TE's do)."""
from __future__ import annotations

import pytest
import torch

from stepwise.convert import dist_io
from stepwise.models.builder import EngineOptions, build_gpt_model
from stepwise.models.hf_config import arch_from_hf_dict
from stepwise.models.te_spec import FINAL_NORM, te_module_paths

# megatron-core 0.16's get_gpt_layer_with_transformer_engine_spec() for a dense decoder without qk-norm
EXPECTED = {"self_attention.linear_qkv": "TELayerNormColumnParallelLinear",
            "self_attention.core_attention": "TEDotProductAttention",
            "self_attention.linear_proj": "TERowParallelLinear",
            "mlp.linear_fc1": "TELayerNormColumnParallelLinear",
            "mlp.linear_fc2": "TERowParallelLinear"}
ARCH = arch_from_hf_dict(dict(model_type="qwen2", vocab_size=64, hidden_size=32, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=2, intermediate_size=64))


def test_te_spec_fuses_norms_into_linears_and_uses_fused_attention():
    from megatron.core.models.gpt import gpt_layer_specs

    assert te_module_paths() == EXPECTED
    assert not hasattr(gpt_layer_specs, "TESpecProvider")  # the placeholder backend was taken out again


def _with_extra_state(module: torch.nn.Module) -> None:
    """Make `module` checkpoint an `_extra_state` (None, as an unused TE module's FP8 state)."""
    cls = type(module)
    module.__class__ = type(f"TE{cls.__name__}", (cls,), {"get_extra_state": lambda self: None,
                                                          "set_extra_state": lambda self, state: None})


def te_shaped(arch):
    """The local-spec model of `arch` with extra state at every TE path and on the final norm."""
    from stepwise.parallel.runtime import init_parallel

    init_parallel(1, 1)
    model = build_gpt_model(arch, EngineOptions(transformer_impl="local"))
    for layer in range(arch.num_layers):
        for path in te_module_paths():
            _with_extra_state(model.get_submodule(f"decoder.layers.{layer}.{path}"))
    _with_extra_state(model.get_submodule(FINAL_NORM))
    return model


@pytest.fixture(scope="module")
def te_shaped_model():
    return te_shaped(ARCH)


def test_converted_checkpoint_objects_are_those_a_te_model_asks_for(te_shaped_model):
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, apply_factories

    state = te_shaped_model.sharded_state_dict()
    apply_factories(state)
    asked = {(v.unique_key, tuple(v.global_shape), tuple(v.global_offset))
             for v in nested_values(state) if isinstance(v, ShardedObject)}
    names = [name for name, _ in te_shaped_model.named_parameters()]
    ours = {(o.unique_key, tuple(o.global_shape), tuple(o.global_offset))
            for o in dist_io.extra_state_objects(names, ARCH.num_layers).values()}
    assert ours == asked
    assert len(ours) == ARCH.num_layers * len(EXPECTED) + 1


def test_each_writer_rank_writes_the_objects_of_its_own_layers():
    names = [f"decoder.layers.{layer}.mlp.linear_fc2.weight" for layer in (1, 2)] + [f"{FINAL_NORM}.weight"]
    modules = dist_io.extra_state_modules(names, 3)
    assert modules == [f"decoder.layers.{layer}.{path}" for layer in (1, 2) for path in EXPECTED] + [FINAL_NORM]
    assert dist_io.extra_state_modules(["embedding.word_embeddings.weight"], 3) == []


def test_a_converted_checkpoint_loads_into_a_model_asking_for_te_extra_state(tmp_path):
    """megatron's load fails on any object the model asks for and the checkpoint lacks."""
    from stepwise.checkpoint.state import load_checkpoint
    from stepwise.convert.hf_to_megatron import convert_hf_to_megatron
    from stepwise.models.hf_config import arch_from_hf
    from tests.helpers import make_tiny_hf_qwen2

    hf_dir = make_tiny_hf_qwen2(tmp_path / "hf")
    convert_hf_to_megatron(hf_dir, tmp_path / "ckpt", progress=False)
    model = te_shaped(arch_from_hf(hf_dir))
    load_checkpoint(tmp_path / "ckpt", model)  # raises on missing or unexpected keys
    from safetensors.torch import load_file

    hf_norm = load_file(hf_dir / "model.safetensors")["model.norm.weight"]
    assert torch.equal(model.get_submodule(FINAL_NORM).weight.detach(), hf_norm)

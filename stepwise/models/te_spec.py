"""Transformer Engine's decoder-layer spec, and which of its modules are TE's (each checkpoints an
`_extra_state`, so a converted checkpoint must hold one for each or a TE model will not load it).

The spec is megatron-core's own `get_gpt_layer_with_transformer_engine_spec()`: the input RMSNorm fused
into the QKV projection and the pre-MLP RMSNorm into the first MLP projection
(`TELayerNormColumnParallelLinear`), `TERowParallelLinear` output projections and `TEDotProductAttention`
(fused attention, FP8 capable). Every TE module stores its FP8 scaling state as `_extra_state` (an
empty object without FP8), and megatron's `dist_checkpointing.load` asks for every one of them.

Which modules those are comes from the same megatron function on every machine: where TE does not
import (this CPU sandbox) it is called with a backend whose classes are named placeholders for the
classes megatron's `TESpecProvider` returns (megatron/core/extensions/transformer_engine_spec_provider.py),
and the spec is walked for them (`te_module_paths`). Outside the layers, the block's final norm is
TE's `TENorm` under either layer spec once TE imports (megatron/core/transformer/transformer_block.py,
core_r0.16: `LayerNormImpl = TENorm` when HAVE_TE), and TE 2's RMSNorm is a fusible operation that
checkpoints `_extra_state` too: `FINAL_NORM`.
"""
from __future__ import annotations

import dataclasses
import functools

FINAL_NORM = "decoder.final_layernorm"
# the classes TESpecProvider returns, all TE modules with `_extra_state` (TEActivationOp, the fused
# activation, only with use_te_activation_func; it is not one of them)
TE_CLASSES = ("TELinear", "TEColumnParallelLinear", "TERowParallelLinear", "TELayerNormColumnParallelLinear",
              "TENorm", "TEDotProductAttention")


def te_layer_spec():
    """megatron's TE decoder-layer spec (needs Transformer Engine)."""
    from megatron.core.models.gpt import gpt_layer_specs

    return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()


def _placeholder(name: str) -> type:
    return type(name, (), {"__module__": __name__, "__doc__": f"stands in for megatron's {name} (TE absent)"})


class _PlaceholderBackend:
    """megatron's `TESpecProvider` interface, answering with placeholders named after TE's classes."""

    def linear(self):
        return _PLACEHOLDERS["TELinear"]

    def column_parallel_linear(self):
        return _PLACEHOLDERS["TEColumnParallelLinear"]

    def row_parallel_linear(self):
        return _PLACEHOLDERS["TERowParallelLinear"]

    def fuse_layernorm_and_linear(self) -> bool:
        return True

    def column_parallel_layer_norm_linear(self):
        return _PLACEHOLDERS["TELayerNormColumnParallelLinear"]

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False):
        return _PLACEHOLDERS["TENorm"]

    def core_attention(self):
        return _PLACEHOLDERS["TEDotProductAttention"]

    def grouped_mlp_modules(self, moe_use_grouped_gemm: bool, moe_use_legacy_grouped_gemm: bool):
        raise NotImplementedError("stepwise builds dense decoders (no MoE)")

    def activation_func(self):
        return _placeholder("TEActivationOp")


_PLACEHOLDERS = {name: _placeholder(name) for name in TE_CLASSES}


def placeholder_te_layer_spec():
    """megatron's TE layer spec built by its own function with `_PlaceholderBackend` in place of
    `TESpecProvider` (which only exists where TE imports); megatron's module is left as it was."""
    from megatron.core.models.gpt import gpt_layer_specs

    missing = object()
    saved = getattr(gpt_layer_specs, "TESpecProvider", missing)
    gpt_layer_specs.TESpecProvider = _PlaceholderBackend
    try:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    finally:
        if saved is missing:
            del gpt_layer_specs.TESpecProvider
        else:
            gpt_layer_specs.TESpecProvider = saved


def te_modules_of(spec, prefix: str = "") -> dict[str, str]:
    """{module path inside a decoder layer: TE class name} of the modules of `spec` (a `ModuleSpec`)
    whose class is one of `TE_CLASSES` or a subclass of one, in the spec's order."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    found: dict[str, str] = {}
    submodules = spec.submodules
    if submodules is None or not dataclasses.is_dataclass(submodules):
        return found
    for field in dataclasses.fields(submodules):
        value = getattr(submodules, field.name)
        module = value.module if isinstance(value, ModuleSpec) else value
        te_class = next((c.__name__ for c in getattr(module, "__mro__", ()) if c.__name__ in TE_CLASSES), None)
        if te_class is not None:  # a TE class or a subclass of one (te_packed_attention's)
            found[prefix + field.name] = te_class
        if isinstance(value, ModuleSpec):
            found.update(te_modules_of(value, f"{prefix}{field.name}."))
    return found


@functools.cache
def te_module_paths() -> dict[str, str]:
    """{path inside a decoder layer: TE class} of megatron's TE layer spec, e.g.
    `self_attention.linear_qkv`: `TELayerNormColumnParallelLinear`."""
    from megatron.core.models.gpt import gpt_layer_specs

    return te_modules_of(te_layer_spec() if gpt_layer_specs.HAVE_TE else placeholder_te_layer_spec())

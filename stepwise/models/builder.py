"""Build a megatron-core `GPTModel` (policy) from a `ModelArch`, for this rank's TP/PP coordinates.

The layer spec follows `model.transformer_impl` (`stepwise.models.precision`): Transformer Engine's
(`stepwise.models.te_spec`; FP8 then follows `fp8.enabled`, checked against the GPU) or megatron's local
spec with the SDPA core attention and (SiLU-gated models) `stepwise.models.swiglu`'s fc1 and gate;
`auto` takes TE when it imports and CUDA is present.
The vocabulary is padded to a multiple of `make_vocab_size_divisible_by x TP`; the padded rows
never receive probability: `stepwise.train.logprobs` masks them. Family numerics (GeGLU, Gemma's
(1 + w) norms and scaled embeddings, llama3 rope frequencies) come from `stepwise.models.variants`.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from stepwise.config.schema import FP8Config, ModelConfig
from stepwise.models import variants
from stepwise.models.attention import SDPAttention
from stepwise.models.rope_positions import follow_position_ids, lean_unfused_rope
from stepwise.models.swiglu import AlreadyActivated, SwiGLU, SwiGLULinear
from stepwise.models.lean_linear import LeanColumnParallelLinear, LeanRowParallelLinear
from stepwise.models.rms_norm import RMSNorm, ZeroCenteredRMSNorm
from stepwise.models.hf_config import ModelArch
from stepwise.models.hidden_output import hand_back_hidden_states
from stepwise.models.precision import fp8_problem, resolve_transformer_impl

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class EngineOptions:
    """How to build (not what): parallel layout, precision, FP8 and kernel choices."""

    tp: int = 1
    pp: int = 1
    dtype: str = "float32"
    sequence_parallel: bool = False
    make_vocab_size_divisible_by: int = 128
    fp8: bool = False
    fp8_recipe: str = FP8Config.recipe
    fp8_margin: int = FP8Config.margin
    fp8_amax_history_len: int = FP8Config.amax_history_len
    transformer_impl: str = ModelConfig.transformer_impl  # auto | te | local
    recompute_activations: bool = False
    # weight gradients straight into DDP's main_grad (megatron's gradient_accumulation_fusion): only for a
    # model DDP wraps, and where the kernel exists (APEX on GPU; stepwise.parallel.cpu_shim on CPU)
    wgrad_into_main_grad: bool = False


def te_in_use(transformer_impl: str) -> bool:
    """Whether `model.transformer_impl` builds Transformer Engine's spec on this machine (an error for `te`
    without TE/CUDA)."""
    te_importable = importlib.util.find_spec("transformer_engine") is not None
    return resolve_transformer_impl(transformer_impl, te_importable, torch.cuda.is_available()) == "te"


def uses_te(options: EngineOptions) -> bool:
    """Whether `options` build Transformer Engine's spec on this machine."""
    return te_in_use(options.transformer_impl)


def wgrad_fusion_available() -> bool:
    """Whether megatron's linear layers have a gradient-accumulation-fusion kernel here."""
    from megatron.core.tensor_parallel import layers

    return layers._grad_accum_fusion_available


def padded_vocab_size(vocab_size: int, options: EngineOptions) -> int:
    multiple = options.make_vocab_size_divisible_by * options.tp
    return -(-vocab_size // multiple) * multiple


def transformer_config(arch: ModelArch, options: EngineOptions):
    """megatron `TransformerConfig` for `arch` under `options` (validated by megatron itself)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    if options.dtype not in DTYPES:
        raise ValueError(f"dtype {options.dtype!r} is not one of {sorted(DTYPES)}")
    dtype = DTYPES[options.dtype]
    fp8 = {}
    if options.fp8:
        if not uses_te(options):
            raise ValueError(f"model.fp8.enabled=true needs Transformer Engine's layer spec, but "
                             f"model.transformer_impl={options.transformer_impl!r} builds the local one here "
                             f"(FP8 runs on a CUDA GPU with transformer_engine; pip install -r requirements-cluster.txt)")
        problem = fp8_problem(torch.cuda.get_device_capability(), options.fp8_recipe)
        if problem:
            raise ValueError(problem)
        fp8 = dict(
            fp8="hybrid",
            fp8_recipe=options.fp8_recipe,
            fp8_margin=options.fp8_margin,
            fp8_amax_history_len=options.fp8_amax_history_len,
            fp8_amax_compute_algo="max",
        )
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,
        ffn_hidden_size=arch.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_eps,
        layernorm_zero_centered_gamma=arch.zero_centered_norm,
        gated_linear_unit=True,
        activation_func=variants.ACTIVATIONS[arch.activation],
        # megatron's hook for an activation module over the whole fc1 output (named for TE, used here by
        # the local spec's SwiGLU: stepwise.models.swiglu)
        use_te_activation_func=arch.activation == "silu" and not uses_te(options),
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        init_method_std=arch.initializer_range,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        tensor_model_parallel_size=options.tp,
        pipeline_model_parallel_size=options.pp,
        sequence_parallel=options.sequence_parallel and options.tp > 1,
        use_cpu_initialization=not torch.cuda.is_available(),
        calculate_per_token_loss=True,
        recompute_granularity="selective" if options.recompute_activations else None,
        gradient_accumulation_fusion=options.wgrad_into_main_grad and wgrad_fusion_available(),
        **fp8,
    )


def layer_spec(options: EngineOptions, config=None):
    """TE's spec (fused RMSNorm + linear, fused attention, FP8; SDPA for packed rows' masks:
    `stepwise.models.te_packed_attention`) or the local spec with SDPA attention.

    The local spec's norms are `stepwise.models.rms_norm`'s ((1 + w) ones under
    `config.layernorm_zero_centered_gamma`: Gemma); `block_spec` gives the final norm the same class.
    """
    from megatron.core.models.gpt import gpt_layer_specs

    if uses_te(options):
        from stepwise.models.te_packed_attention import take_masks
        from stepwise.models.te_spec import te_layer_spec

        return take_masks(te_layer_spec())
    spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = SDPAttention
    attention, mlp = spec.submodules.self_attention.submodules, spec.submodules.mlp.submodules
    attention.linear_qkv, attention.linear_proj = LeanColumnParallelLinear, LeanRowParallelLinear
    mlp.linear_fc1, mlp.linear_fc2 = LeanColumnParallelLinear, LeanRowParallelLinear
    if config is not None and config.use_te_activation_func:
        if config.sequence_parallel:
            mlp.activation_func = SwiGLU
        else:
            mlp.linear_fc1, mlp.activation_func = SwiGLULinear, AlreadyActivated
    zero_centered = config is not None and config.layernorm_zero_centered_gamma
    spec.submodules.input_layernorm = spec.submodules.pre_mlp_layernorm = (
        ZeroCenteredRMSNorm if zero_centered else RMSNorm)
    return spec


def block_spec(spec, config):
    """This pipeline stage's block of `spec`'s layers, its final norm the layers' own norm class where
    that is stepwise's (megatron would build its default norm there); other specs as they are."""
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import (TransformerBlock, TransformerBlockSubmodules,
                                                             get_num_layers_to_build)

    norm = getattr(getattr(spec, "submodules", None), "input_layernorm", None)
    if not (isinstance(norm, type) and issubclass(norm, RMSNorm)):
        return spec
    return ModuleSpec(module=TransformerBlock, submodules=TransformerBlockSubmodules(
        layer_specs=[spec] * get_num_layers_to_build(config), layer_norm=norm))


def build_gpt_model(arch: ModelArch, options: EngineOptions, max_seq_len: int | None = None, model_class=None,
                    hidden_output: bool = False):
    """A `GPTModel` (or the subclass `model_class`) holding this rank's shard of `arch` (random init;
    load weights separately). With `hidden_output` (training and scoring of policies) its last stage
    hands back final hidden states instead of logits (`stepwise.models.hidden_output`)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_model import GPTModel

    config = transformer_config(arch, options)
    model = (model_class or GPTModel)(
        config=config,
        transformer_layer_spec=block_spec(layer_spec(options, config), config),
        vocab_size=padded_vocab_size(arch.vocab_size, options),
        max_sequence_length=max_seq_len or arch.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=int(arch.rope_theta),
    )
    variants.set_rope_frequencies(model, arch)
    follow_position_ids(model)
    lean_unfused_rope()
    if arch.scale_embeddings and model.pre_process:
        variants.scale_embedding_output(model, arch.hidden_size)
    if hidden_output:
        hand_back_hidden_states(model)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model

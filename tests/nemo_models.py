"""NeMo-2-shaped checkpoint directories made from the tiny HF family models, laid out as NeMo 2 writes
them (facts from NeMo's source, named in `stepwise.convert.nemo_config` / `nemo_import`):

    DIR/context/model.yaml       yaml.safe_dump of the model's config: `_target_` class names, every
                                 field (defaults too), functions / dtypes / enums as `{_target_, _call_}`
    DIR/context/io.json          a stand-in (only nemo-toolkit reads the real fiddle graph)
    DIR/context/nemo_tokenizer/  the HF tokenizer files (`tokenizer.pretrained_model_name: nemo_tokenizer`)
    DIR/weights/                 megatron torch_dist checkpoint, keys `module.`-prefixed, layers stacked,
                                 TE norm names, an `_extra_state` object per TE module and layer

The config is the one NeMo's HF importer (`HFQwen2Importer.config` ...) makes from the HF config.json;
Gemma's importer records no vocab_size, so its embedding is padded to `make_vocab_size_divisible_by`.
"""
from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import yaml

from stepwise.convert import dist_io
from stepwise.convert.hf_io import read_hf_state, state_dtype
from stepwise.convert.mapping import hf_to_megatron_state
from stepwise.convert.nemo_import import PREFIX
from stepwise.convert.tables import rules_for
from stepwise.models.hf_config import arch_from_hf, arch_from_hf_dict, load_hf_config
from stepwise.models.te_spec import te_module_paths

NEMO = "nemo.collections.llm.gpt.model."


def _callable(target: str, call: bool = False) -> dict:
    return {"_target_": target, "_call_": call}


def nemo_config(hf: dict, dtype: str = "float32") -> tuple[str, dict]:
    """(model class, config dict) NeMo's HF importer of `hf`'s family writes into model.yaml."""
    arch = arch_from_hf_dict(hf)
    common = dict(
        num_layers=arch.num_layers, hidden_size=arch.hidden_size, ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads, num_query_groups=arch.num_kv_heads,
        init_method_std=arch.initializer_range, layernorm_epsilon=arch.norm_eps, gated_linear_unit=True,
        rotary_base=arch.rope_theta, normalization="RMSNorm", add_bias_linear=False,
        position_embedding_type="rope", rotary_percent=1.0, seq_len_interpolation_factor=None,
        num_moe_experts=None, qk_layernorm=False, multi_latent_attention=False, window_size=None,
        layernorm_zero_centered_gamma=False, add_qkv_bias=False, kv_channels=None, hidden_dropout=0.0,
        attention_dropout=0.0, fp16=dtype == "float16", bf16=dtype == "bfloat16",
        params_dtype=_callable(f"torch.{dtype}"), tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
        activation_func=_callable("torch.nn.functional.silu"), seq_length=arch.max_position_embeddings,
        make_vocab_size_divisible_by=128, vocab_size=arch.vocab_size, init_method=None,
        transformer_layer_spec=_callable(NEMO + "base.default_layer_spec"),
        attention_backend=_callable("megatron.core.transformer.enums.AttnBackend", True),
        generation_config=_callable("transformers.generation.configuration_utils.GenerationConfig", True),
        fp16_lm_cross_entropy=False, parallel_output=True, tp_comm_overlap_cfg=None)
    if arch.family == "qwen2":  # qwen2.py: the importer always unties and keeps HF's vocab_size
        return "qwen2.Qwen2Model", dict(common, _target_=NEMO + "qwen2.Qwen2Config", add_qkv_bias=True,
                                        share_embeddings_and_output_weights=False)
    if arch.family == "llama":  # llama.py: Llama31Config when the rope is llama3; head_dim as kv_channels
        config = dict(common, _target_=NEMO + "llama.LlamaConfig", kv_channels=hf.get("head_dim"),
                      share_embeddings_and_output_weights=arch.tie_word_embeddings)
        rope = arch.rope_scaling
        if rope.get("rope_type") == "llama3":
            config.update(_target_=NEMO + "llama.Llama31Config", scale_factor=rope["factor"],
                          low_freq_factor=rope["low_freq_factor"], high_freq_factor=rope["high_freq_factor"],
                          old_context_len=rope["original_max_position_embeddings"])
        return "llama.LlamaModel", config
    if arch.family == "gemma":  # gemma.py: no vocab_size, kv_channels from GemmaConfig, openai_gelu, 1 + w norms
        return "gemma.GemmaModel", dict(common, _target_=NEMO + "gemma.GemmaConfig", vocab_size=None,
                                        kv_channels=arch.head_dim, layernorm_zero_centered_gamma=True,
                                        activation_func=_callable("nemo.collections.llm.fn.activation.openai_gelu"),
                                        share_embeddings_and_output_weights=True, make_vocab_size_divisible_by=64)
    raise ValueError(f"no NeMo config for family {arch.family!r}")


def model_yaml(hf: dict, dtype: str = "float32", **changes) -> dict:
    """The whole model.yaml dict (model, config, tokenizer, optimizer) with `changes` to the config."""
    model, config = nemo_config(hf, dtype)
    return {"_target_": NEMO + model, "config": dict(config, **changes), "model_transform": None,
            "optim": {"_target_": "nemo.lightning.pytorch.optim.megatron.MegatronOptimizerModule",
                      "config": {"_target_": "megatron.core.optimizer.optimizer_config.OptimizerConfig",
                                 "lr": 0.0001, "optimizer": "adam", "use_distributed_optimizer": True},
                      "lr_scheduler": None},
            "tokenizer": {"_target_": "nemo.collections.common.tokenizers.huggingface.auto_tokenizer.AutoTokenizer",
                          "pretrained_model_name": "nemo_tokenizer", "vocab_file": None, "merges_file": None,
                          "use_fast": True, "trust_remote_code": False}}


def write_nemo_weights(hf_dir: Path, weights: Path, rows: int, drop: str | None = None, extra: dict | None = None):
    """The HF model's weights as NeMo saves them; `drop` leaves out every tensor whose name holds it,
    `extra` adds {megatron name: tensor}."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    arch = arch_from_hf(hf_dir)
    state = hf_to_megatron_state(rules_for(arch), read_hf_state(hf_dir), arch, rows)
    state.update(extra or {})
    sharded = {}
    for name, tensor in state.items():
        if drop and drop in name:
            continue
        plain = dist_io.sharded_tensor(name, tensor, arch.num_layers)
        sharded[name] = dataclasses.replace(plain, key=PREFIX + plain.key)
    for module in te_module_paths():  # TE modules' fp8 metadata, an empty BytesIO without fp8
        key = f"{PREFIX}decoder.layers.{module}._extra_state"
        for layer in range(arch.num_layers):
            sharded[f"{key}.{layer}"] = ShardedObject(key, io.BytesIO(), (arch.num_layers,), (layer,), replica_id=0)
    weights.mkdir(parents=True)
    checkpoint = {"epoch": 0, "global_step": 0, "pytorch-lightning_version": "2.5.1", "state_dict": {},
                  "loops": {}, "sharded_state_dict": sharded}
    dist_checkpointing.save(checkpoint, str(weights))
    return arch, state_dtype(state)


def make_nemo_checkpoint(hf_dir: str | Path, out: str | Path, tokenizer, drop: str | None = None,
                         extra: dict | None = None, **changes) -> Path:
    """Write a NeMo 2 checkpoint directory of the HF model in `hf_dir` with `tokenizer` (an HF tokenizer)
    in context/nemo_tokenizer; `changes` alter the config; returns `out`."""
    from stepwise.parallel.runtime import init_parallel

    hf_dir, out = Path(hf_dir), Path(out)
    hf = load_hf_config(hf_dir)
    init_parallel(1, 1)
    config = model_yaml(hf, **changes)["config"]
    rows = config["vocab_size"] or -(-hf["vocab_size"] // config["make_vocab_size_divisible_by"]) * \
        config["make_vocab_size_divisible_by"]
    _, dtype = write_nemo_weights(hf_dir, out / "weights", rows, drop, extra)
    document = model_yaml(hf, dtype, **changes)
    context = out / "context"
    (context / "nemo_tokenizer").mkdir(parents=True)
    (context / "model.yaml").write_text(yaml.safe_dump(document))
    (context / "io.json").write_text(json.dumps({"root": {"type": "stand-in"}, "objects": {}}))
    tokenizer.save_pretrained(str(context / "nemo_tokenizer"))
    return out

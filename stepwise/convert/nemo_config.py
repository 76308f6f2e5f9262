"""The model config of a NeMo 2 checkpoint (`context/model.yaml`) -> the HF `config.json` of its family.

NeMo 2 writes the model's config twice into `context/`: `io.json`, a fiddle graph of NeMo classes that
only nemo-toolkit can rebuild, and `model.yaml`, the same config as plain YAML (`_target_` names the
class, every dataclass field is listed, functions and dtypes become `{_target_: ..., _call_: false}`).
`model.yaml` is read here with no NeMo import; a context holding only `io.json` is read through
nemo-toolkit when it is installed. Qwen2/2.5 (`Qwen2Model`), Llama 3.x (`LlamaModel`) and Gemma 1.x
(`GemmaModel`) map to HF configs the way NeMo's own HF exporters map them; a config the stepwise
model would not reproduce (MoE, biases, another norm or activation) is refused naming the key.
`--hf-template` supplies what NeMo does not record; its shape fields must agree with NeMo's.

Facts from NeMo 2's source: nemo/lightning/io/mixin.py (`io_dump`: io.json and `model.yaml` with every
default), nemo/lightning/io/registry.py + artifact/file.py (the tokenizer directory copied into the
context), nemo/collections/llm/gpt/model/{qwen2,llama,gemma}.py (configs, HF importers and exporters),
nemo/export/trt_llm/nemo_ckpt_loader/nemo_file.py (NeMo's own model.yaml reader, no NeMo classes).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from stepwise.models.hf_config import arch_from_hf_dict, load_hf_config

MODULE = "nemo.collections.llm.gpt.model."
MODELS = {MODULE + "qwen2.Qwen2Model": "qwen2", MODULE + "llama.LlamaModel": "llama",
          MODULE + "gemma.GemmaModel": "gemma"}  # GemmaModel (not its config) scales the embeddings
ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM", "gemma": "GemmaForCausalLM"}
ACTIVATIONS = {"silu": "silu", "openai_gelu": "gelu_pytorch_tanh"}  # last name of activation_func's _target_
DEFAULT_ACTIVATION = {"qwen2": "silu", "llama": "silu", "gemma": "openai_gelu"}
# config fields stepwise's model fixes; a field absent from the YAML is not checked
FIXED = {"normalization": "RMSNorm", "gated_linear_unit": True, "position_embedding_type": "rope",
         "add_bias_linear": False, "rotary_percent": 1.0, "seq_len_interpolation_factor": None,
         "num_moe_experts": None, "qk_layernorm": False, "multi_latent_attention": False, "window_size": None}
PER_FAMILY = {"add_qkv_bias": {"qwen2": True, "llama": False, "gemma": False},
              "layernorm_zero_centered_gamma": {"qwen2": False, "llama": False, "gemma": True}}
LLAMA31_ROPE = {"scale_factor": "factor", "low_freq_factor": "low_freq_factor",
                "high_freq_factor": "high_freq_factor", "old_context_len": "original_max_position_embeddings"}
# ModelArch field -> HF key: must agree between the NeMo config and an --hf-template
SHAPE_FIELDS = {"family": "model_type", "vocab_size": "vocab_size", "hidden_size": "hidden_size",
                "num_layers": "num_hidden_layers", "num_attention_heads": "num_attention_heads",
                "num_kv_heads": "num_key_value_heads", "head_dim": "head_dim",
                "ffn_hidden_size": "intermediate_size", "tie_word_embeddings": "tie_word_embeddings"}
TEMPLATE_KEEPS = ("max_position_embeddings",)  # NeMo's seq_length is the training length
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class NemoCheckpointError(ValueError):
    """A NeMo checkpoint that cannot be imported (the message names the file and key)."""


def read_model_config(context: Path) -> tuple[dict[str, Any], str]:
    """(the `model` section of a NeMo 2 context as a dict, the file it came from)."""
    import yaml

    yaml_file, io_json = context / "model.yaml", context / "io.json"
    if yaml_file.is_file():
        try:
            model = yaml.safe_load(yaml_file.read_text())
        except yaml.YAMLError as error:
            raise NemoCheckpointError(f"{yaml_file}: bad YAML ({error})") from None
        if not isinstance(model, dict) or not isinstance(model.get("config"), dict):
            raise NemoCheckpointError(f"{yaml_file}: no 'config' mapping (not a NeMo 2 model.yaml)")
        return model, str(yaml_file)
    if not io_json.is_file():
        raise NemoCheckpointError(f"{context}: neither model.yaml nor io.json (not a NeMo 2 checkpoint context)")
    try:
        from nemo.lightning.io import load_context
    except ImportError:
        raise NemoCheckpointError(
            f"{yaml_file}: missing, and {io_json} (a fiddle graph of NeMo classes) is readable only by NeMo: "
            "install nemo-toolkit (requirements-cluster.txt), or export the checkpoint to HF with NeMo "
            "and use `stepwise convert hf-to-megatron`") from None
    return model_from_context(load_context, context), str(io_json)


def model_from_context(load_context, context: Path) -> dict[str, Any]:
    """The model.yaml-shaped dict of a context read by nemo-toolkit's `load_context`."""
    def dotted(obj) -> str:
        return f"{obj.__module__}.{obj.__qualname__}"

    config = load_context(context, subpath="model.config")
    model = load_context(context, subpath="model", build=False)
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    fields = {k: {"_target_": dotted(v)} if callable(v) and hasattr(v, "__qualname__") else v for k, v in fields.items()}
    return {"_target_": dotted(model.__fn_or_cls__), "config": {"_target_": dotted(type(config)), **fields}}


def tokenizer_dir(model: dict[str, Any], context: Path, hf_template: str | Path | None = None) -> Path | None:
    """The HF tokenizer files NeMo copied into the context (`tokenizer.pretrained_model_name`, by default
    `nemo_tokenizer/`), else the template's, if any."""
    name = (model.get("tokenizer") or {}).get("pretrained_model_name")
    candidates = ([context / name] if isinstance(name, str) else []) + [context / "nemo_tokenizer"]
    candidates += [Path(hf_template)] if hf_template else []
    return next((path for path in candidates if any((path / n).is_file() for n in TOKENIZER_MARKERS)), None)


def _activation(config: dict, family: str, source: str) -> str:
    value = config.get("activation_func") or {"_target_": DEFAULT_ACTIVATION[family]}
    name = str(value.get("_target_") if isinstance(value, dict) else value).rsplit(".", 1)[-1]
    if name not in ACTIVATIONS:
        raise NemoCheckpointError(f"{source}: config.activation_func {name!r} is not supported "
                                  f"(supported: {sorted(ACTIVATIONS)})")
    return ACTIVATIONS[name]


def _llama3_rope(config: dict, source: str) -> dict | None:
    present = [key for key in LLAMA31_ROPE if key in config]
    if not present:
        return None
    missing = [key for key in LLAMA31_ROPE if config.get(key) is None]
    if missing:
        raise NemoCheckpointError(f"{source}: Llama 3.1 rope scaling needs config.{missing[0]}")
    scaling = {hf: float(config[nemo]) for nemo, hf in LLAMA31_ROPE.items()}
    scaling["original_max_position_embeddings"] = int(scaling["original_max_position_embeddings"])
    return dict(scaling, rope_type="llama3")


def hf_config_from_nemo(model: dict[str, Any], source: str) -> dict[str, Any]:
    """HF config.json fields of a NeMo model dict (no vocab_size when NeMo recorded none). Absent fields
    take megatron's / NeMo GPTConfig's defaults."""
    target = model.get("_target_")
    if target not in MODELS:
        raise NemoCheckpointError(f"{source}: _target_ {target!r} is not a supported model "
                                  f"(supported: {sorted(MODELS)})")
    family, config = MODELS[target], model["config"]
    fixed = dict(FIXED, **{key: values[family] for key, values in PER_FAMILY.items()})
    for key, wanted in fixed.items():
        if key in config and config[key] != wanted:
            raise NemoCheckpointError(f"{source}: config.{key}={config[key]!r} is not supported for {target} "
                                      f"(stepwise builds {key}={wanted!r})")
    for key in ("num_layers", "hidden_size", "num_attention_heads"):
        if not config.get(key):
            raise NemoCheckpointError(f"{source}: missing key 'config.{key}'")
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    hf = {"architectures": [ARCHITECTURES[family]], "model_type": family,
          "num_hidden_layers": int(config["num_layers"]), "hidden_size": hidden, "num_attention_heads": heads,
          "num_key_value_heads": int(config.get("num_query_groups") or heads),
          "head_dim": int(config.get("kv_channels") or hidden // heads),
          "intermediate_size": int(config.get("ffn_hidden_size") or 4 * hidden),
          "max_position_embeddings": int(config.get("seq_length", 1024)),
          "initializer_range": float(config.get("init_method_std", 0.02)),
          "rms_norm_eps": float(config.get("layernorm_epsilon", 1e-5)),
          "rope_theta": float(config.get("rotary_base", 10000)),
          "tie_word_embeddings": bool(config.get("share_embeddings_and_output_weights", True)),
          "hidden_act": _activation(config, family, source)}
    rope = _llama3_rope(config, source) if family == "llama" else None
    if rope:
        hf["rope_scaling"] = rope
    if config.get("vocab_size"):
        hf["vocab_size"] = int(config["vocab_size"])
    return hf


def _compare(merged: dict, template: dict, source: str, template_file: str) -> list[str]:
    """Raise naming the first shape field that differs; return the other ModelArch fields that do."""
    ours, theirs = arch_from_hf_dict(merged, source), arch_from_hf_dict(template, template_file)
    for field, key in SHAPE_FIELDS.items():
        if getattr(ours, field) != getattr(theirs, field):
            raise NemoCheckpointError(f"{source}: {key} is {getattr(ours, field)!r} by the NeMo config but "
                                      f"{getattr(theirs, field)!r} in {template_file}")
    return sorted(f for f, value in ours.to_dict().items() if value != getattr(theirs, f))


def resolve_hf_config(model: dict[str, Any], source: str, hf_template: str | Path | None,
                      tokenizer: Path | None) -> tuple[dict[str, Any], list[str]]:
    """(HF config.json, the ModelArch fields where NeMo's config overrode the template). The template (if any) is the base
    and must agree on shapes; vocab_size comes from NeMo, else the template, else the tokenizer's length
    (as NeMo's Llama / Gemma exporters take it); bos / eos ids from the template, else the tokenizer."""
    derived = hf_config_from_nemo(model, source)
    template_file = "" if not hf_template else str(Path(hf_template) / "config.json" if Path(hf_template).is_dir()
                                                    else hf_template)
    template = load_hf_config(hf_template) if hf_template else {}
    loaded = []

    def tokens():
        if not loaded:
            from stepwise.tasks.tokenizer import load_tokenizer

            loaded.append(load_tokenizer(tokenizer))
        return loaded[0]

    if "vocab_size" not in derived and "vocab_size" not in template:
        if tokenizer is None:
            raise NemoCheckpointError(f"{source}: config.vocab_size is null and there are no tokenizer files "
                                      "to count; pass --hf-template DIR")
        derived["vocab_size"] = len(tokens())
    merged = {k: v for k, v in template.items() if k not in ("rope_scaling", "rope_parameters")}  # NeMo's rope rules
    merged.update({k: v for k, v in derived.items() if k not in TEMPLATE_KEEPS or k not in template})
    overridden = _compare(merged, template, source, template_file) if template else []
    for key in ("bos_token_id", "eos_token_id"):
        if merged.get(key) is None and tokenizer is not None and getattr(tokens(), key) is not None:
            merged[key] = getattr(tokens(), key)
    return merged, overridden

"""Read a Hugging Face `config.json` into `ModelArch`, the architecture facts stepwise builds from.

Both rope forms are read: the released `rope_theta`/`rope_scaling` keys and transformers 5.x's
`rope_parameters` dict. Families are registered in `FAMILIES` (Qwen2/2.5, Llama 3.x, Gemma 1.x); a
new family is one entry there (and a conversion table in `stepwise/convert/tables.py`). A config
asking for something the megatron model would not reproduce (biases on every projection, another
activation or rope type) is refused with the key named, never silently built differently.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ModelArch:
    """Architecture of a decoder-only LM, independent of HF or megatron naming."""

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    max_position_embeddings: int
    norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    qkv_bias: bool
    activation: str = "silu"  # a key of stepwise.models.variants.ACTIVATIONS
    rope_scaling: dict[str, Any] = field(default_factory=dict)
    initializer_range: float = 0.02
    zero_centered_norm: bool = False  # RMSNorm scales by (1 + w) (Gemma)
    scale_embeddings: bool = False  # embedding output times sqrt(hidden_size), in the model dtype (Gemma)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ConfigError(ValueError):
    """A `config.json` stepwise cannot build (the message names the file and key)."""


@dataclass(frozen=True)
class Family:
    """What a model_type fixes, beyond the sizes every config.json carries."""

    name: str
    qkv_bias: bool  # Qwen2 always has q/k/v biases; Llama and Gemma only under `attention_bias` (refused)
    tie_default: bool  # tie_word_embeddings when config.json omits it (transformers' class default)
    zero_centered_norm: bool = False
    scale_embeddings: bool = False
    activation_keys: tuple[str, ...] = ("hidden_act",)


FAMILIES = {
    "qwen2": Family("qwen2", qkv_bias=True, tie_default=False),
    "llama": Family("llama", qkv_bias=False, tie_default=False),
    "gemma": Family("gemma", qkv_bias=False, tie_default=True, zero_centered_norm=True, scale_embeddings=True,
                    activation_keys=("hidden_act", "hidden_activation")),
}
# HF activation name -> stepwise's; Gemma's legacy "gelu" means the tanh approximation (as in transformers)
HF_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
GEMMA_LEGACY_ACTIVATIONS = {"gelu": "gelu_tanh"}
ROPE_TYPES = {"llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
UNSUPPORTED_FLAGS = ("mlp_bias", "use_bidirectional_attention")  # true in config.json -> ConfigError


def _rope(hf: dict[str, Any], source: str) -> tuple[float, dict[str, Any]]:
    params = hf.get("rope_parameters") or {}
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or {k: v for k, v in params.items() if k != "rope_theta"}
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type in (None, "default"):
        return float(theta), {}
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"{source}: rope_scaling type {rope_type!r} is not supported (supported: {sorted(ROPE_TYPES)})")
    for key in ROPE_TYPES[rope_type]:
        if key not in scaling:
            raise ConfigError(f"{source}: rope_scaling of type {rope_type!r} is missing key '{key}'")
    return float(theta), dict(scaling, rope_type=rope_type)


def _activation(hf: dict[str, Any], family: Family, source: str) -> str:
    key = next((k for k in family.activation_keys if hf.get(k)), None)
    if key is None:
        return "silu"
    names = dict(HF_ACTIVATIONS, **(GEMMA_LEGACY_ACTIVATIONS if family.name == "gemma" else {}))
    if hf[key] not in names:
        raise ConfigError(f"{source}: {key}={hf[key]!r} is not supported (supported: {sorted(names)})")
    return names[hf[key]]


def _check_flags(hf: dict[str, Any], family: Family, source: str) -> None:
    flags = UNSUPPORTED_FLAGS + (() if family.qkv_bias else ("attention_bias",))
    for key in flags:
        if hf.get(key):
            raise ConfigError(f"{source}: {key}={hf[key]!r} is not supported for model_type '{family.name}'")


def arch_from_hf_dict(hf: dict[str, Any], source: str = "config.json") -> ModelArch:
    """Build a `ModelArch` from the dict of an HF `config.json` (`source` names it in errors)."""
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise ConfigError(f"{source}: model_type {model_type!r} is not supported (supported: {sorted(FAMILIES)})")
    family = FAMILIES[model_type]
    required = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"]
    for key in required:
        if key not in hf:
            raise ConfigError(f"{source}: missing key '{key}'")
    _check_flags(hf, family, source)
    heads = int(hf["num_attention_heads"])
    head_dim = int(hf.get("head_dim") or hf["hidden_size"] // heads)
    theta, scaling = _rope(hf, source)
    tie = hf.get("tie_word_embeddings")
    return ModelArch(
        family=family.name,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_attention_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        ffn_hidden_size=int(hf["intermediate_size"]),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        tie_word_embeddings=family.tie_default if tie is None else bool(tie),
        qkv_bias=family.qkv_bias,
        activation=_activation(hf, family, source),
        rope_scaling=scaling,
        initializer_range=float(hf.get("initializer_range", 0.02)),
        zero_centered_norm=family.zero_centered_norm,
        scale_embeddings=family.scale_embeddings,
    )


def load_hf_config(path: str | Path) -> dict[str, Any]:
    """The dict of `path/config.json` (or of `path` if it is the file itself)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"{file}: no such file (expected a Hugging Face config.json)")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{file}:{error.lineno}: bad JSON ({error.msg})") from None


def arch_from_hf(path: str | Path) -> ModelArch:
    """`ModelArch` of an HF model directory or `config.json` file."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    return arch_from_hf_dict(load_hf_config(path), source=str(file))

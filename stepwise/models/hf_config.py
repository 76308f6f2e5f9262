"""Read a Hugging Face `config.json` into `ModelArch`, the architecture facts stepwise builds from.

Both rope forms are read: the released `rope_theta`/`rope_scaling` keys and transformers 5.x's
`rope_parameters` dict. Families are registered in `FAMILIES`; a new family is one entry there
(and a conversion table in `stepwise/convert/`).
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
    activation: str = "silu"
    rope_scaling: dict[str, Any] = field(default_factory=dict)
    initializer_range: float = 0.02

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ConfigError(ValueError):
    """A `config.json` stepwise cannot build (the message names the file and key)."""


FAMILIES = {
    # model_type -> (family, qkv bias, activation)
    "qwen2": ("qwen2", True, "silu"),
}


def _rope(hf: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    params = hf.get("rope_parameters") or {}
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling.get("rope_type", scaling.get("type")) in (None, "default"):
        scaling = {}
    return float(theta), dict(scaling)


def arch_from_hf_dict(hf: dict[str, Any], source: str = "config.json") -> ModelArch:
    """Build a `ModelArch` from the dict of an HF `config.json` (`source` names it in errors)."""
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise ConfigError(f"{source}: model_type {model_type!r} is not supported (supported: {sorted(FAMILIES)})")
    family, qkv_bias, activation = FAMILIES[model_type]
    required = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"]
    for key in required:
        if key not in hf:
            raise ConfigError(f"{source}: missing key '{key}'")
    heads = int(hf["num_attention_heads"])
    head_dim = int(hf.get("head_dim") or hf["hidden_size"] // heads)
    theta, scaling = _rope(hf)
    return ModelArch(
        family=family,
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
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        activation=activation,
        rope_scaling=scaling,
        initializer_range=float(hf.get("initializer_range", 0.02)),
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

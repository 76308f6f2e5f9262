"""HF (config.json + safetensors) -> a model-only megatron distributed checkpoint.

The checkpoint stores global shapes (loads at any TP/PP), keeps the checkpoint's dtype unless
`dtype` is given, and keeps config.json + tokenizer files in `OUT/hf/` so the way back needs nothing
else.

    python conversion/hf_to_megatron.py --hf DIR --out DIR [--dtype float32|bfloat16]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from stepwise.checkpoint.layout import save_hf_metadata
from stepwise.checkpoint.state import save_checkpoint
from stepwise.convert.hf_io import read_hf_state, state_dtype
from stepwise.convert.mapping import MappingError, hf_to_megatron_state
from stepwise.convert.tables import rules_for
from stepwise.models.builder import DTYPES, EngineOptions, build_gpt_model, padded_vocab_size
from stepwise.models.critic import build_critic_model
from stepwise.models.hf_config import arch_from_hf, load_hf_config


def load_mapped_weights(model, mapped: dict[str, torch.Tensor]) -> None:
    """Copy mapped tensors into a TP1/PP1 model; every parameter must be covered."""
    missing = [k for k, v in model.state_dict().items() if torch.is_tensor(v) and "_extra_state" not in k and k not in mapped]
    if missing:
        raise MappingError(f"megatron model parameters not covered by the table: {missing[:5]}")
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, tensor in mapped.items():
            if name not in params:
                raise MappingError(f"table maps to '{name}', which the megatron model does not have")
            if params[name].shape != tensor.shape:
                raise MappingError(f"'{name}': shape {tuple(tensor.shape)} != model {tuple(params[name].shape)}")
            params[name].copy_(tensor)


def convert_hf_to_megatron(hf_dir: str | Path, out_dir: str | Path, dtype: str | None = None) -> dict:
    """Convert; returns a summary (tensors, bytes, seconds, dtype)."""
    from stepwise.parallel.runtime import init_parallel

    began = time.perf_counter()
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    arch = arch_from_hf(hf_dir)
    state = read_hf_state(hf_dir)
    if arch.tie_word_embeddings and "lm_head.weight" in state and "score.weight" not in state:
        if not torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"]):
            raise MappingError(f"{hf_dir}: tie_word_embeddings is true but lm_head.weight differs from the embedding")
        del state["lm_head.weight"]
    dtype = dtype or state_dtype(state)
    critic = "score.weight" in state  # a *ForTokenClassification value model
    init_parallel(1, 1)
    options = EngineOptions(dtype=dtype, use_te=False)
    model = (build_critic_model if critic else build_gpt_model)(arch, options)
    mapped = hf_to_megatron_state(rules_for(arch, value_head=critic), state, arch, padded_vocab_size(arch.vocab_size, options))
    load_mapped_weights(model, {k: v.to(DTYPES[dtype]) for k, v in mapped.items()})
    save_checkpoint(out_dir, 0, model, meta={"source": str(hf_dir), "dtype": dtype, "family": arch.family, "tp": 1, "pp": 1,
                                             "model_kind": "critic" if critic else "policy"})
    save_hf_metadata(out_dir, load_hf_config(hf_dir), hf_dir)
    summary = {"tensors": len(state), "bytes": sum(t.numel() * t.element_size() for t in state.values()),
               "seconds": round(time.perf_counter() - began, 2), "dtype": dtype, "out": str(out_dir)}
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="HF checkpoint -> megatron distributed checkpoint")
    parser.add_argument("--hf", required=True, help="HF model directory (config.json + safetensors)")
    parser.add_argument("--out", required=True, help="checkpoint root to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: the checkpoint's dtype")
    args = parser.parse_args(argv)
    print(json.dumps(convert_hf_to_megatron(args.hf, args.out, args.dtype)))
    return 0

"""A megatron checkpoint (conversion or training, any TP/PP, with or without optimizer state; a
policy or a critic) -> an HF directory: model.safetensors + config.json + tokenizer files + generation_config.json,
loadable by `AutoModelForCausalLM` (a critic: `AutoModelForTokenClassification`, num_labels=1) /
`AutoTokenizer` and servable by vLLM.

    python conversion/megatron_to_hf.py --ckpt DIR --out DIR
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from stepwise.checkpoint import layout
from stepwise.checkpoint.state import load_checkpoint
from stepwise.convert.hf_io import write_safetensors
from stepwise.convert.mapping import megatron_to_hf_state
from stepwise.convert.tables import rules_for
from stepwise.data.jsonl import atomic_write_json
from stepwise.models.builder import DTYPES, EngineOptions, build_gpt_model
from stepwise.models.critic import build_critic_model
from stepwise.models.hf_config import arch_from_hf_dict


def _saved_dtype(meta: dict, hf_config: dict) -> str:
    return meta.get("dtype") or hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"


def convert_megatron_to_hf(ckpt_dir: str | Path, out_dir: str | Path) -> dict:
    """Convert; returns a summary (tensors, bytes, seconds, dtype)."""
    from stepwise.parallel.runtime import init_parallel

    began = time.perf_counter()
    out_dir = Path(out_dir)
    hf_meta = layout.hf_metadata_dir(ckpt_dir)
    hf_config = json.loads((hf_meta / "config.json").read_text())
    arch = arch_from_hf_dict(hf_config, source=str(hf_meta / "config.json"))
    meta = layout.read_meta(layout.resolve(ckpt_dir))
    dtype = _saved_dtype(meta, hf_config)
    critic = meta.get("model_kind") == "critic"
    init_parallel(1, 1)
    model = (build_critic_model if critic else build_gpt_model)(arch, EngineOptions(dtype=dtype, use_te=False))
    load_checkpoint(ckpt_dir, model)
    state = {k: v for k, v in model.state_dict().items() if torch.is_tensor(v) and "_extra_state" not in k}
    hf_state = megatron_to_hf_state(rules_for(arch, value_head=critic), state, arch)
    # megatron keeps some tensors (norm weights) in fp32 whatever params_dtype says: cast back
    size = write_safetensors({k: v.detach().cpu().to(DTYPES[dtype]) for k, v in hf_state.items()}, out_dir)
    for name in layout.TOKENIZER_FILES:
        if (hf_meta / name).is_file():
            shutil.copyfile(hf_meta / name, out_dir / name)
    config = {k: v for k, v in hf_config.items() if k != "torch_dtype"}
    config["dtype"] = dtype
    if critic:  # a value model: HF *ForTokenClassification with one label
        prefix = hf_config.get("architectures", ["Qwen2ForCausalLM"])[0].replace("ForCausalLM", "").replace("ForTokenClassification", "")
        config.update(architectures=[f"{prefix}ForTokenClassification"], num_labels=1,
                      id2label={"0": "value"}, label2id={"value": 0})
    atomic_write_json(out_dir / "config.json", config)
    generation = {"eos_token_id": hf_config.get("eos_token_id"), "pad_token_id": hf_config.get("pad_token_id"),
                  "bos_token_id": hf_config.get("bos_token_id"), "do_sample": False}
    if not (out_dir / "generation_config.json").exists():
        atomic_write_json(out_dir / "generation_config.json", {k: v for k, v in generation.items() if v is not None})
    return {"tensors": len(hf_state), "bytes": size, "seconds": round(time.perf_counter() - began, 2),
            "dtype": dtype, "out": str(out_dir)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="megatron checkpoint -> HF directory")
    parser.add_argument("--ckpt", required=True, help="checkpoint root (follows 'latest') or iteration directory")
    parser.add_argument("--out", required=True, help="HF directory to write")
    args = parser.parse_args(argv)
    print(json.dumps(convert_megatron_to_hf(args.ckpt, args.out)))
    return 0

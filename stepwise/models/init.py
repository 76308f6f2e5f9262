"""A random-weight Hugging Face model for a from-scratch recipe (the embedded task's tiny policy).

Initialising in HF format and converting keeps the initial weights independent of the TP/PP layout
and exercises the conversion path on every run.
"""
from __future__ import annotations

from pathlib import Path

import torch


def random_hf_model(hf_fields: dict, tokenizer, out_dir: str | Path, seed: int) -> Path:
    """Save a random-init `AutoModelForCausalLM` built from `hf_fields` (+ the tokenizer) to `out_dir`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(hf_fields)
    model_type = fields.pop("model_type", "qwen2")
    fields.setdefault("vocab_size", len(tokenizer))
    if fields["vocab_size"] < len(tokenizer):
        raise ValueError(f"model.hf_config.vocab_size={fields['vocab_size']} < tokenizer size {len(tokenizer)}")
    fields.update(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    config = AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out

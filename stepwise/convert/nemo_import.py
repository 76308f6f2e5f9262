"""A NeMo 2 checkpoint directory (Qwen2/2.5, Llama 3.x, Gemma 1.x) -> a stepwise checkpoint: a
model-only megatron dist checkpoint + `OUT/hf/` (config.json, tokenizer files), the same format
`stepwise convert hf-to-megatron` writes, so `stepwise convert megatron-to-hf` exports it and
training loads it at any TP/PP. nemo-toolkit is not needed when the context has `model.yaml`.

    DIR/weights/   megatron torch_dist checkpoint (metadata.json, common.pt, .metadata, *.distcp): the
                   model's keys carry NeMo's `module.` prefix, layers stacked on a leading axis, TE names,
                   and TE `_extra_state` objects (dropped here)
    DIR/context/   model.yaml (read by `stepwise.convert.nemo_config`), io.json, nemo_tokenizer/

Streamed: each tensor (one layer's slice of a stacked key) is read when the checkpoint writer asks
for it, so host memory holds about one tensor. The tensors keep their dtype unless `dtype` is given.
Missing or unknown keys, and shapes that do not fit the config, are errors naming the key. (NeMo
facts: nemo/lightning/megatron_parallel.py adds `module.`; nemo/lightning/pytorch/strategies/utils.py
stacks the layers; NeMo's own readers, e.g. HFLlamaExporter.ckpt_load, strip the prefix, skip
`_extra_state` and read `context/model.yaml` with `yaml.safe_load`.)

    python conversion/nemo_to_megatron.py --nemo DIR --out DIR [--dtype D] [--hf-template DIR]
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from stepwise.checkpoint import layout
from stepwise.convert import dist_io, ranks
from stepwise.convert.hf_io import common_dtype
from stepwise.convert.hf_to_megatron import peak_rss_mb
from stepwise.convert.mapping import MappingError, megatron_shape, pairs, to_hf_tensors, to_megatron_tensor
from stepwise.convert.megatron_to_hf import check_stored_keys
from stepwise.convert.nemo_config import NemoCheckpointError, read_model_config, resolve_hf_config, tokenizer_dir
from stepwise.convert.tables import rules_for
from stepwise.models.builder import DTYPES, EngineOptions, padded_vocab_size
from stepwise.models.hf_config import arch_from_hf_dict

PREFIX = "module."  # NeMo's MegatronParallel wraps the megatron model as `module`
EXTRA_STATE = "._extra_state"


def checkpoint_parts(nemo_dir: Path) -> tuple[Path, Path]:
    """(weights, context) of a NeMo 2 checkpoint; NemoCheckpointError naming what is missing."""
    weights, context = nemo_dir / "weights", nemo_dir / "context"
    for part in (weights, context):
        if not part.is_dir():
            raise NemoCheckpointError(f"{part}: missing (a NeMo 2 checkpoint holds weights/ and context/)")
    if (weights / "adapter_metadata.json").is_file():
        raise NemoCheckpointError(f"{weights / 'adapter_metadata.json'}: a PEFT adapter checkpoint; merge it into "
                                  "its base model with NeMo first (llm.peft.merge_lora)")
    metadata = weights / "metadata.json"
    backend = json.loads(metadata.read_text()).get("sharded_backend") if metadata.is_file() else None
    if backend != "torch_dist":
        raise NemoCheckpointError(f"{metadata}: sharded_backend {backend!r}; only megatron's 'torch_dist' is read")
    return weights, context


def model_tensors(weights: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Model tensor keys without the NeMo prefix -> (global shape, dtype); `_extra_state` dropped."""
    stored = {k: v for k, v in dist_io.stored_tensors(weights).items() if EXTRA_STATE not in k}
    strays = sorted(key for key in stored if not key.startswith(PREFIX))
    if strays:
        raise MappingError(f"{weights}: keys without NeMo's '{PREFIX}' prefix: {strays[:5]} ({len(strays)} in all)")
    return {key[len(PREFIX):]: value for key, value in stored.items()}


def _expected_shapes(hf_config: dict) -> dict[str, tuple[int, ...]]:
    """HF tensor shapes of `hf_config`, from transformers' model built on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**copy.deepcopy(hf_config))  # transformers rewrites rope dicts in place
    with torch.device("meta"):
        return {name: tuple(t.shape) for name, t in AutoModelForCausalLM.from_config(config).state_dict().items()}


def plan_entries(weights: Path, stored: dict, hf_config: dict, arch, source: str, target: torch.dtype):
    """(the writer's entries, bytes they read): each checked against the shape `hf_config` implies."""
    hf_shapes = _expected_shapes(hf_config)
    padded = padded_vocab_size(arch.vocab_size, EngineOptions())

    def entry(rule, hf_names, name):
        key, layer = dist_io.locate(name)
        shape, stored_dtype = stored[key]
        shape = shape if layer is None else shape[1:]
        planned = megatron_shape(rule, [hf_shapes[n] for n in hf_names], arch, padded)
        vocab = rule.transform == "vocab"  # NeMo may pad the vocabulary rows its own way
        if not (shape[0] >= arch.vocab_size and shape[1:] == planned[1:] if vocab else shape == planned):
            raise NemoCheckpointError(f"{weights}: '{PREFIX}{key}' holds {shape}{' per layer' * (layer is not None)}, "
                                      f"which does not fit {source} (expected {planned})")

        def produce():
            tensor = dist_io.load_tensors(weights, {name: (shape, stored_dtype)}, arch.num_layers, PREFIX)[name]
            return to_megatron_tensor(rule, list(to_hf_tensors(rule, tensor, arch)), arch, padded).to(target)

        return dist_io.Entry(name, planned, target, produce), torch.Size(shape).numel() * stored_dtype.itemsize

    entries, sizes = zip(*(entry(*triple) for triple in pairs(rules_for(arch), arch)))
    return list(entries), sum(sizes)


def import_nemo2(nemo_dir: str | Path, out_dir: str | Path, dtype: str | None = None,
                 hf_template: str | Path | None = None, progress: bool = True) -> dict:
    """Import; returns a summary (tensors and bytes read, seconds, dtype, family, tokenizer, the
    fields where NeMo's config overrode the template, peak RSS)."""
    began = time.perf_counter()
    nemo_dir, out_dir = Path(nemo_dir), Path(out_dir)
    weights, context = checkpoint_parts(nemo_dir)
    model, source = read_model_config(context)
    tokenizer = tokenizer_dir(model, context, hf_template)
    hf_config, overridden = resolve_hf_config(model, source, hf_template, tokenizer)
    arch = arch_from_hf_dict(hf_config, source=source)
    stored = model_tensors(weights)
    try:
        check_stored_keys(pairs(rules_for(arch), arch), stored, weights, arch.num_layers, ())
    except MappingError as error:
        raise MappingError(f"{error} (NeMo keys carry the prefix '{PREFIX}')") from None
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    dtype = dtype or common_dtype(stored_dtype for _, stored_dtype in stored.values())
    entries, nbytes = plan_entries(weights, stored, hf_config, arch, source, DTYPES[dtype])
    dist_io.publish_streamed(entries, arch.num_layers, out_dir, {"source": str(nemo_dir), "dtype": dtype,
                                                                "family": arch.family, "model_kind": "policy"},
                             "nemo -> megatron", progress)
    ranks.on_rank_zero(lambda: layout.save_hf_metadata(out_dir, hf_config, tokenizer))
    return {"tensors": len(entries), "bytes": nbytes, "seconds": round(time.perf_counter() - began, 2),
            "dtype": dtype, "family": arch.family, "tokenizer": str(tokenizer) if tokenizer else None,
            "from_nemo_over_template": overridden, "peak_rss_mb": peak_rss_mb(), "out": str(out_dir)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="NeMo 2 checkpoint -> megatron distributed checkpoint (streamed)")
    parser.add_argument("--nemo", required=True, help="NeMo 2 checkpoint directory (weights/ + context/)")
    parser.add_argument("--out", required=True, help="checkpoint root to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: the checkpoint's dtype")
    parser.add_argument("--hf-template", default=None,
                        help="HF model directory: config.json base (shapes must agree) and fallback tokenizer")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        summary = import_nemo2(args.nemo, args.out, args.dtype, args.hf_template, progress=not args.no_progress)
    except (ValueError, MappingError, layout.CheckpointError) as error:  # NemoCheckpointError, ConfigError ...
        print(f"nemo-to-megatron: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0

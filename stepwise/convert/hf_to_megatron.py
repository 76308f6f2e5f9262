"""HF (config.json + safetensors) -> a model-only megatron distributed checkpoint, streamed.

Tensors are read one at a time (`safe_open`) and written as the checkpoint writer reaches them, so
host memory holds a few tensors, not the model; no megatron model is built. The checkpoint stores
global shapes (loads at any TP/PP), keeps the source dtype in the files unless `dtype` is given, and
keeps config.json + tokenizer files in `OUT/hf/` so the way back needs nothing else. Missing,
unknown or unused keys are errors naming the key. Called on every rank of a launched step, each rank
converts a contiguous range of layers into its own file of the checkpoint (the stored tensors are
those of a one-process conversion) and rank 0 publishes it (`dist_io.publish_streamed`).

    python conversion/hf_to_megatron.py --hf DIR --out DIR [--dtype float32|bfloat16|float16]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from stepwise.checkpoint import layout
from stepwise.convert import dist_io, ranks
from stepwise.convert.hf_io import HFSource, common_dtype
from stepwise.convert.mapping import MappingError, check_hf_keys, megatron_shape, pairs, to_megatron_tensor
from stepwise.convert.tables import rules_for
from stepwise.models.builder import DTYPES, EngineOptions, padded_vocab_size
from stepwise.models.hf_config import arch_from_hf, load_hf_config

TIED_COPY = "lm_head.weight"


def _drop_tied_copy(source: HFSource, names: set[str], tied: bool, critic: bool) -> None:
    """transformers may store a tied output matrix a second time; it must equal the embedding (rank 0
    reads both)."""
    if not tied or critic or TIED_COPY not in names:
        return

    def check():
        output, embedding = source.read([TIED_COPY, "model.embed_tokens.weight"])
        if not torch.equal(output, embedding):
            raise MappingError(f"{source.dir}: tie_word_embeddings is true but {TIED_COPY} differs from the embedding")

    ranks.on_rank_zero(check)
    names.discard(TIED_COPY)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB: Linux's VmHWM (getrusage's maxrss would
    include the parent's memory when this process was forked from a large one), else getrusage."""
    import resource

    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def convert_hf_to_megatron(hf_dir: str | Path, out_dir: str | Path, dtype: str | None = None,
                           progress: bool = True) -> dict:
    """Convert; returns a summary (tensors and bytes read, seconds, dtype, peak RSS).

    Collective when launched with several ranks (torchrun, srun): every rank calls it with the same
    arguments; all return once the checkpoint is published."""
    from stepwise.parallel.runtime import init_distributed

    began = time.perf_counter()
    init_distributed()
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    arch = arch_from_hf(hf_dir)
    source = HFSource(hf_dir)
    names = source.names()
    critic = "score.weight" in names  # a *ForTokenClassification value model
    _drop_tied_copy(source, names, arch.tie_word_embeddings, critic)
    rules = rules_for(arch, value_head=critic)
    check_hf_keys(rules, arch, names)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    dtype = dtype or common_dtype(source.dtype[n] for n in names)
    target, padded = DTYPES[dtype], padded_vocab_size(arch.vocab_size, EngineOptions())

    def maker(rule, hf_names):
        return lambda: to_megatron_tensor(rule, source.read(hf_names), arch, padded).to(target)

    entries = [dist_io.Entry(name, megatron_shape(rule, [source.shape[n] for n in hf_names], arch, padded), target,
                             maker(rule, hf_names)) for rule, hf_names, name in pairs(rules, arch)]
    dist_io.publish_streamed(entries, arch.num_layers, out_dir, {"source": str(hf_dir), "dtype": dtype, "family": arch.family,
                                                                "model_kind": "critic" if critic else "policy"},
                             "hf -> megatron", progress)
    ranks.on_rank_zero(lambda: layout.save_hf_metadata(out_dir, load_hf_config(hf_dir), hf_dir))
    return {"tensors": len(names), "bytes": sum(source.nbytes(n) for n in names),
            "seconds": round(time.perf_counter() - began, 2), "dtype": dtype, "peak_rss_mb": peak_rss_mb(),
            "out": str(out_dir), "ranks": ranks.world()[1]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="HF checkpoint -> megatron distributed checkpoint (streamed)")
    parser.add_argument("--hf", required=True, help="HF model directory (config.json + safetensors)")
    parser.add_argument("--out", required=True, help="checkpoint root to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: the checkpoint's dtype")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    print(json.dumps(convert_hf_to_megatron(args.hf, args.out, args.dtype, progress=not args.no_progress)))
    return 0

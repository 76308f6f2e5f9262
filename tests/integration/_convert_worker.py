"""Worker: both converters on every rank of a torchrun job, then the new checkpoint's fp32 logits at TP = world.

    torchrun --nproc-per-node W _convert_worker.py HF CKPT SOURCE_CKPT BACK MAX_SHARD_SIZE OUT_DIR VOCAB CORRUPT

HF -> megatron writes CKPT; megatron -> HF exports SOURCE_CKPT (a one-process conversion) to BACK,
then tries to export CORRUPT (a damaged copy of it), which must fail on every rank. Each rank saves
its summaries and that error to OUT_DIR/summary_RANK.json; the logging rank saves OUT_DIR/logits.pt.
"""
import json
import sys
from pathlib import Path

import torch

from stepwise.convert.compare import megatron_logits
from stepwise.convert.hf_to_megatron import convert_hf_to_megatron
from stepwise.convert.megatron_to_hf import convert_megatron_to_hf
from stepwise.parallel.runtime import launch_env

if __name__ == "__main__":
    hf, ckpt, source_ckpt, back, max_shard_size, out, vocab, corrupt = sys.argv[1:9]
    rank, world_size, _ = launch_env()
    summaries = {"hf_to_megatron": convert_hf_to_megatron(hf, ckpt, progress=False),
                 "megatron_to_hf": convert_megatron_to_hf(source_ckpt, back, max_shard_size=max_shard_size,
                                                          progress=False)}
    try:
        convert_megatron_to_hf(corrupt, Path(out) / "never", progress=False)
    except Exception as error:  # noqa: BLE001 - recorded for the test
        summaries["corrupt"] = f"{type(error).__name__}: {error}"
    (Path(out) / f"summary_{rank}.json").write_text(json.dumps(summaries))
    ids = torch.randint(0, int(vocab), (2, 24), generator=torch.Generator().manual_seed(0))
    logits = megatron_logits(ckpt, ids, world_size, 1, dtype="float32")
    if logits is not None:
        torch.save(logits, Path(out) / "logits.pt")

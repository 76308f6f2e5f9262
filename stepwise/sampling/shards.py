"""Sample completions for a list of records into resumable JSONL shards, and read them back.

`out_dir/shard_00000.jsonl`, `shard_00001.jsonl`, ... each hold the samples of `shard_size`
consecutive records (each prompt a string or a list of token ids), one line per (record, sample
index): the record's own fields plus `sample_index`, `response`, `token_ids`, `token_logprobs`,
`finish_reason` and `num_tokens`. Shards are written atomically and skipped when already present,
so a killed run resumes where it stopped. `out_dir/sampling.json` records the settings; resuming
with different ones is an error. Samples are keyed by (seed, prompt, sample index) only, so
resharding gives the same samples.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from stepwise.data.jsonl import DataError, atomic_write_json, read_jsonl, write_jsonl
from stepwise.sampling.base import Sampler, SamplingParams
from stepwise.sampling.requests import prompt_digest_bytes, prompt_problem

SAMPLE_FIELDS = ("sample_index", "response", "token_ids", "token_logprobs", "finish_reason", "num_tokens")
SETTINGS_FILE = "sampling.json"


def shard_path(out_dir: str | os.PathLike, index: int) -> Path:
    return Path(out_dir) / f"shard_{index:05d}.jsonl"


def _check_settings(out_dir: Path, settings: dict[str, Any]) -> None:
    """Write the run's settings, or check that an existing run used the same ones."""
    path = out_dir / SETTINGS_FILE
    if path.exists():
        with path.open(encoding="utf-8") as handle:
            previous = json.load(handle)
        if previous != settings:
            changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
            raise DataError(f"{path}: existing shards were sampled with different settings ({', '.join(changed)}); "
                            f"delete {out_dir} to sample again")
    else:
        atomic_write_json(path, settings)


def sample_to_shards(sampler: Sampler, records: list[dict], prompt_key: str, params: SamplingParams,
                     out_dir: str | os.PathLike, shard_size: int = 256, desc: str = "sample",
                     rank: int = 0, world_size: int = 1) -> list[Path]:
    """Sample `params.n` completions of `record[prompt_key]` (a string, or a non-empty list of token ids
    used as given) for every record into shards of `out_dir`.

    With `world_size` > 1 this worker only handles the shards with index % world_size == rank (data
    parallelism over shards, e.g. one vLLM engine per node). Returns the paths of this worker's
    shards, in order (all shards when world_size is 1).
    """
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive integer, got {shard_size!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    for index, record in enumerate(records):
        if prompt_key not in record:
            raise DataError(f"record {index}: key '{prompt_key}' is missing (a string prompt or a list of token ids)")
        problem = prompt_problem(record[prompt_key])
        if problem:
            raise DataError(f"record {index}: key '{prompt_key}' {problem}")
        clash = [name for name in SAMPLE_FIELDS if name in record]
        if clash:
            raise DataError(f"record {index}: has field(s) {clash} that the sample output would overwrite")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prompts_digest = hashlib.sha256()
    for record in records:
        prompts_digest.update(prompt_digest_bytes(record[prompt_key]))
    _check_settings(out_dir, {"params": params.to_dict(), "prompt_key": prompt_key, "shard_size": shard_size,
                              "records": len(records), "prompts_sha256": prompts_digest.hexdigest()})

    starts = range(0, len(records), shard_size)
    mine = [(index, start) for index, start in enumerate(starts) if index % world_size == rank]
    todo = [(index, start) for index, start in mine if not shard_path(out_dir, index).exists()]
    total = sum(len(records[start:start + shard_size]) for _, start in mine)
    pending = sum(len(records[start:start + shard_size]) for _, start in todo)
    started, prompts_done, tokens_done = time.monotonic(), 0, 0
    with tqdm(total=total, initial=total - pending, desc=desc, unit="prompt", dynamic_ncols=True,
              disable=rank != 0) as bar:  # one bar: rank 0 shows its share
        for index, start in todo:
            chunk = records[start:start + shard_size]
            results = sampler.generate([record[prompt_key] for record in chunk], params)
            if len(results) != len(chunk):
                raise RuntimeError(f"sampler {sampler.name} returned {len(results)} results for {len(chunk)} prompts")
            lines = []
            for record, completions in zip(chunk, results):
                for sample_index, completion in enumerate(completions):
                    lines.append({**record, "sample_index": sample_index, "response": completion.text,
                                  "token_ids": completion.token_ids, "token_logprobs": completion.token_logprobs,
                                  "finish_reason": completion.finish_reason,
                                  "num_tokens": len(completion.token_ids)})
                    tokens_done += len(completion.token_ids)
            write_jsonl(shard_path(out_dir, index), lines)
            prompts_done += len(chunk)
            elapsed = max(time.monotonic() - started, 1e-9)
            bar.update(len(chunk))
            bar.set_postfix(prompts_per_s=f"{prompts_done / elapsed:.2f}", tokens_per_s=f"{tokens_done / elapsed:.1f}")
    return [shard_path(out_dir, index) for index, _ in mine]


def read_shards(out_dir: str | os.PathLike) -> list[dict]:
    """All sample lines of all shards in `out_dir`, in shard order."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise DataError(f"{out_dir}: no such shard directory")
    records: list[dict] = []
    for path in sorted(out_dir.glob("shard_*.jsonl")):
        records.extend(read_jsonl(path))
    return records

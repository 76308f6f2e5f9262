"""Writing an HF checkpoint as safetensors shards, tensor by tensor, without holding a shard in memory.

The tensors' names, shapes and dtypes are planned first, so each shard's header (and its byte
offsets) is known before its data arrives; tensors are then streamed into the file in plan order.
One shard is written as `model.safetensors`; more as `model-0000k-of-0000n.safetensors` with a
`model.safetensors.index.json`, as transformers does. Every file is written to a temporary name,
fsynced and renamed into place. An earlier export's entry points (its index or single file) are
removed before the first new shard and the new index is written last, so an interrupted export
fails to load instead of mixing two exports; the earlier export's unused shards are removed at the end.
"""
from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from stepwise.convert.hf_io import INDEX, SAFETENSORS_DTYPES
from stepwise.data.jsonl import _fsync_dir, atomic_write_json

DEFAULT_MAX_SHARD_SIZE = "5GB"
UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
STALE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?")


def parse_size(text: str | int) -> int:
    """Bytes of '5GB' / '500MB' / '2GiB' / an integer (decimal units, as transformers reads them)."""
    if isinstance(text, int):
        return text
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = (found.group(2) or "B").upper() if found else ""
    if not found or unit not in UNITS:
        raise ValueError(f"bad size {text!r} (examples: 5GB, 500MB, 2GiB)")
    return int(float(found.group(1)) * UNITS[unit])


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * self.dtype.itemsize


def plan_shards(specs: list[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive groups of at most `max_bytes` (a larger tensor gets a shard of its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _header(shard: list[TensorSpec]) -> bytes:
    entries, offset = {"__metadata__": {"format": "pt"}}, 0
    for spec in shard:
        entries[spec.name] = {"dtype": SAFETENSORS_DTYPES[spec.dtype], "shape": list(spec.shape),
                              "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header


def _write_shard(path: Path, shard: list[TensorSpec], tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        with open(temporary, "wb") as handle:
            handle.write(_header(shard))
            for spec in shard:
                name, tensor = next(tensors)
                if (name, tuple(tensor.shape), tensor.dtype) != (spec.name, spec.shape, spec.dtype):
                    raise ValueError(f"got '{name}' {tuple(tensor.shape)} {tensor.dtype}, "
                                     f"planned '{spec.name}' {spec.shape} {spec.dtype}")
                handle.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class ShardPlan:
    """An export's files: their names and the tensors of each, in order (the same for any number of
    writers, so a split export has the file names and bytes of a one-process one)."""

    names: list[str]
    shards: list[list[TensorSpec]]

    @property
    def weight_map(self) -> dict[str, str]:
        return {spec.name: name for name, shard in zip(self.names, self.shards) for spec in shard}

    @property
    def entry_points(self) -> set[str]:
        """What transformers opens first: the index of a sharded export, else its one file."""
        return {INDEX} if len(self.names) > 1 else set(self.names)


def plan_files(specs: list[TensorSpec], max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE) -> ShardPlan:
    shards = plan_shards(specs, parse_size(max_shard_size))
    count = len(shards)
    names = (["model.safetensors"] if count == 1
             else [f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)])
    return ShardPlan(names, shards)


def begin_export(out_dir: Path) -> None:
    """Before any shard: remove an earlier export's entry points, so an interrupted one fails to load."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for entry_point in (out_dir / INDEX, out_dir / "model.safetensors"):
        entry_point.unlink(missing_ok=True)


def write_files(plan: ShardPlan, indices: list[int], tensors: Iterator[tuple[str, torch.Tensor]],
                out_dir: Path) -> dict[str, str]:
    """Write the plan's files `indices` from `tensors` (yielded in their order); returns their
    {tensor name: file name}."""
    for index in indices:
        _write_shard(out_dir / plan.names[index], plan.shards[index], tensors)
    if next(tensors, None) is not None:
        raise ValueError("more tensors than planned")
    return {spec.name: plan.names[index] for index in indices for spec in plan.shards[index]}


def finish_export(plan: ShardPlan, out_dir: Path) -> dict:
    """After every shard: the index (last: the export now loads), then an earlier export's unused
    shards removed; returns files and bytes."""
    total = sum(spec.nbytes for shard in plan.shards for spec in shard)
    if len(plan.names) > 1:
        atomic_write_json(out_dir / INDEX, {"metadata": {"total_size": total}, "weight_map": plan.weight_map})
    keep = set(plan.names) | plan.entry_points
    for stale in out_dir.iterdir():
        if STALE.fullmatch(stale.name) and stale.name not in keep:
            stale.unlink()
    _fsync_dir(out_dir)
    return {"files": plan.names, "bytes": total}


def write_sharded(specs: list[TensorSpec], tensors: Iterator[tuple[str, torch.Tensor]], out_dir: Path,
                  max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE) -> dict:
    """Write `tensors` (yielded in the order of `specs`) into `out_dir`; returns files and bytes."""
    plan = plan_files(specs, max_shard_size)
    begin_export(out_dir)
    write_files(plan, list(range(len(plan.names))), tensors, out_dir)
    return finish_export(plan, out_dir)

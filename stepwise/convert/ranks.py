"""A conversion split over the ranks of a launched step: who converts what, and the few collectives.

Every rank of the step calls the converter. The work is cut into contiguous runs of items (a
checkpoint's reading groups: the embedding, each decoder layer, the rest; or an HF export's shard
files), balanced by bytes, so rank r converts one contiguous range of layers; the first rank holds
the embedding and the last the final norm and output layer. Small shared files (configs, the index,
`stepwise.json`) are written by rank 0 between barriers. With one process every helper runs locally
and a conversion behaves exactly as it did before the split.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, TypeVar

import torch.distributed as dist

from stepwise.parallel.agree import raise_if_any, rank_symmetric

T = TypeVar("T")


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def contiguous_split(weights: list[int], parts: int) -> list[int]:
    """The part (0 .. parts-1) of each item, nondecreasing along the list, balanced by weight: an item
    goes to the part its weight's midpoint falls in when the total is cut into `parts` equal spans."""
    if parts < 1:
        raise ValueError(f"cannot split over {parts} parts")
    total = sum(weights)
    if total <= 0:
        return [0] * len(weights)
    owners, before = [], 0
    for weight in weights:
        owners.append(min(parts - 1, (2 * before + weight) * parts // (2 * total)))
        before += weight
    return owners


def balanced_split(sizes: dict[str, int], parts: int) -> list[list[str]]:
    """`sizes`' names dealt into `parts` sorted lists of similar total size (largest first, each to
    the lightest list); every name lands in exactly one list."""
    shares: list[list[str]] = [[] for _ in range(parts)]
    loads = [0] * parts
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        lightest = loads.index(min(loads))
        shares[lightest].append(name)
        loads[lightest] += sizes[name]
    return [sorted(share) for share in shares]


def gather(value: T) -> list[T]:
    """Collective: every rank's `value`, in rank order, on every rank."""
    rank, size = world()
    if size == 1:
        return [value]
    gathered: list = [None] * size
    dist.all_gather_object(gathered, value)
    return gathered


def on_rank_zero(function: Callable[[], T]) -> T:
    """Collective: run `function` on rank 0 only; every rank returns its result once it is done (a
    barrier), or raises its error."""
    rank, size = world()
    result, error = None, None
    if rank == 0:
        try:
            result = function()
        except Exception as caught:  # noqa: BLE001 - re-raised on every rank just below
            error = caught
    raise_if_any(error)
    if size == 1:
        return result
    box = [result]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def verify_checksum_share(iteration_dir: Path, meta: dict) -> None:
    """Collective: the CRC-32 check of a checkpoint's files (`layout.verify_checksums`) split over
    the ranks by size, each rank reading its share; a mismatch found by one rank raises on all."""
    from stepwise.checkpoint import layout

    rank, size = world()
    with rank_symmetric():
        recorded = sorted(meta.get("crc32") or {})
        sizes = {name: (Path(iteration_dir) / name).stat().st_size for name in recorded}
        layout.verify_checksums(iteration_dir, meta, balanced_split(sizes, size)[rank])

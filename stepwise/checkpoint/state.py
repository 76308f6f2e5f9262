"""Save and load model / optimizer / scheduler / RNG / trainer state as a megatron dist checkpoint.

Tensors are stored with their global shapes (megatron `ShardedTensor`s), so a checkpoint written at
one TP/PP/DP loads at another (the per-rank RNG state only where the topology is the same). Every rank
calls these functions together (they are collective). Saving stages, fsyncs (one process per node)
and publishes atomically (`layout.publish`) with every file's size and CRC-32 (the ranks share the
checksumming out); loading first checks sizes on rank 0 and checksums on all ranks (each its share)
and fails on every rank, naming the damaged file, before megatron reads a byte.
"""
from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from stepwise.checkpoint import layout
from stepwise.parallel import cpu_shim, inject
from stepwise.parallel.agree import raise_if_any


def unwrap(model):
    """The bare GPTModel under DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def _rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        state["cuda"] = torch.cuda.get_rng_state()
        state["tracker"] = get_cuda_rng_tracker().get_states()
    else:
        state["tracker"] = cpu_shim.TRACKER.get_states()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available():
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        torch.cuda.set_rng_state(state["cuda"])
        get_cuda_rng_tracker().set_states(state["tracker"])
    else:
        cpu_shim.TRACKER.set_states(state["tracker"])


def _topology() -> list[int]:
    """[PP, TP, DP] sizes of the current megatron parallel state."""
    from megatron.core import parallel_state as ps

    return [ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size(),
            ps.get_data_parallel_world_size()]


def _rng_sharded_object():
    """This rank's RNG state as one element of a (PP, TP, DP) grid of objects."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    shape = tuple(_topology())
    offset = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank())
    return ShardedObject("rng_state", _rng_state(), shape, offset, replica_id=0)


def _sharded_state(model, optimizer, with_rng: bool, is_loading: bool = False, skip=None) -> dict[str, Any]:
    model_state = unwrap(model).sharded_state_dict()
    if skip is not None:
        model_state = {k: v for k, v in model_state.items() if not skip(k)}
    state: dict[str, Any] = {"model": model_state}
    if optimizer is not None:
        # is_loading initialises the optimizer's (still empty) state so it has tensors to load into
        state["optimizer"] = optimizer.sharded_state_dict(model_state, is_loading=is_loading)
    if with_rng:
        state["rng_state"] = _rng_sharded_object()
    return state


def _rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _my_files(names: list[str]) -> list[str]:
    """This rank's share of `names`: the ranks together read every file once."""
    rank, world = _rank_and_world()
    return names[rank::world]


def _flush_and_checksum(staged: Path) -> dict[str, str] | None:
    """Each rank fsyncs and checksums only the files it wrote (no rank reads another's bytes back, on
    any node); the CRC-32s are gathered on rank 0 (None elsewhere). An error on any rank is raised on all."""
    rank, world = _rank_and_world()
    names = sorted(layout.file_sizes(staged))  # after the barrier every file is there, on a shared file system
    mine, problem = {}, None
    try:
        own = [name for name in names if layout.writer_rank(name, world) == rank]
        layout.fsync_files(staged, own, directories=rank == 0)
        mine = layout.file_checksums(staged, own)
    except OSError as error:
        problem = layout.CheckpointError(f"{staged}: cannot flush or checksum: {error}")
    raise_if_any(problem)
    if world == 1:
        return mine
    parts = [None] * world if rank == 0 else None
    dist.gather_object(mine, parts, dst=0)
    return {name: value for part in parts for name, value in part.items()} if rank == 0 else None


def _save_strategy():
    """megatron's fully parallel save: the data-parallel replicas split the writing of the tensors they
    hold in common (every DP rank writes 1/DP of the model and optimizer instead of DP rank 0 alone)."""
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    return FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(), group, do_cache_distribution=True)


def save_checkpoint(
    root: str | Path,
    step: int,
    model,
    optimizer=None,
    scheduler=None,
    trainer_state: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
    async_queue=None,
) -> Path:
    """Write `ROOT/iter_<step>` atomically (staged, then renamed) and repoint `ROOT/latest`.

    With `async_queue` (megatron's AsyncCallsQueue) the shards are written by a forked process (a
    copy-on-write snapshot of this moment's state) while training goes on; the publication (flush,
    checksums, rename, `latest`) runs when the queue is finalized, on every rank."""
    from megatron.core import dist_checkpointing

    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        layout.staging_dir(root, step)
    if dist.is_initialized():
        dist.barrier()
    staged = Path(root) / (layout.iteration_name(step) + ".tmp")
    state = _sharded_state(model, optimizer, with_rng=True)
    state["scheduler"] = scheduler.state_dict() if scheduler is not None else None
    state["trainer"] = dict(trainer_state or {})
    full_meta = {"step": step, "saved_at": time.time(), "has_optimizer": optimizer is not None,
                 "topology": _topology(), **(meta or {})}
    if async_queue is None:
        dist_checkpointing.save(state, str(staged), sharded_strategy=_save_strategy())
        _publish_staged(root, step, staged, full_meta)
    else:
        request = dist_checkpointing.save(state, str(staged), sharded_strategy=_save_strategy(), async_sharded_save=True)
        request.add_finalize_fn(lambda: _publish_staged(root, step, staged, full_meta))
        async_queue.schedule_async_request(request)
    return Path(root) / layout.iteration_name(step)


def _publish_staged(root: str | Path, step: int, staged: Path, meta: dict) -> None:
    """(Every rank.) Once all shards of `staged` are written: flush and checksum each rank's own files,
    then rank 0 publishes the iteration."""
    if dist.is_initialized():
        dist.barrier()  # every rank's shards are written
    checksums = _flush_and_checksum(staged)
    inject.kill_point("staged", step)
    if not dist.is_initialized() or dist.get_rank() == 0:
        layout.publish(root, step, meta, checksums)
    if dist.is_initialized():
        dist.barrier()


def load_checkpoint(path: str | Path, model, optimizer=None, scheduler=None, load_rng: bool = False,
                    skip=None) -> dict[str, Any]:
    """Load a checkpoint root (via `latest`) or iteration dir into this rank's shards.

    Returns `{"meta": ..., "trainer": ...}`. The model may be at any TP/PP. `skip(key)` leaves
    matching model parameters as they are (a critic's fresh head on a policy trunk).
    """
    iteration = layout.resolve(path)
    meta = layout.read_meta(iteration)
    if optimizer is not None and not meta.get("has_optimizer"):
        raise layout.CheckpointError(f"{iteration}: holds no optimizer state (a model-only checkpoint)")
    problem = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            layout.verify_files(iteration, meta)
        except layout.CheckpointError as error:
            problem = error
    raise_if_any(problem)
    try:  # the ranks share the files out: one read of the checkpoint in all
        layout.verify_checksums(iteration, meta, _my_files(sorted(meta.get("crc32") or {})))
    except (layout.CheckpointError, OSError) as error:
        problem = error
    raise_if_any(problem)
    if load_rng and meta.get("topology") not in (None, _topology()):
        load_rng = False  # the per-rank RNG grid has another shape; model, optimizer and data order still load
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"[stepwise] {iteration}: saved at [PP, TP, DP] = {meta['topology']}, now {_topology()}; "
                  "RNG state not restored", flush=True)
    from megatron.core import dist_checkpointing

    template = _sharded_state(model, optimizer, with_rng=load_rng, is_loading=True, skip=skip)
    try:
        loaded = dist_checkpointing.load(template, str(iteration), strict="assume_ok_unexpected")
    except Exception as error:  # megatron raises many types; name the directory
        raise layout.CheckpointError(f"{iteration}: cannot load checkpoint: {error}") from error
    missing, unexpected = unwrap(model).load_state_dict(loaded["model"], strict=False)
    missing = [k for k in missing if "_extra_state" not in k and not (skip and skip(k))]
    if missing or unexpected:
        raise layout.CheckpointError(f"{iteration}: model keys missing {missing[:5]} / unexpected {unexpected[:5]}")
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None and loaded.get("scheduler") is not None:
        scheduler.load_state_dict(loaded["scheduler"])
    if load_rng:
        _set_rng_state(loaded["rng_state"])
    return {"meta": meta, "trainer": loaded.get("trainer") or {}}

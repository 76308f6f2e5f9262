"""A megatron dist checkpoint (torch_dist format) read and written tensor by tensor, with no model.

Megatron names (`decoder.layers.3.input_layernorm.weight`) map to checkpoint keys the way
megatron-core's own `sharded_state_dict()` maps them (tested against it): layer tensors are one
global tensor per key with the layer index as a prepended axis, and the local spec's norms use the
Transformer Engine names (`self_attention.linear_qkv.layer_norm_weight`), so a checkpoint loads into
either spec at any TP/PP. Writing resolves each tensor lazily, when torch.distributed.checkpoint's
writer asks for it, so host memory holds one tensor at a time; reading loads the tensors of one
layer. Both need a (size-1) process group, as megatron's own save and load do.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

LAYERS = "decoder.layers."
# the local spec stores its norms under the names TE's fused layernorm-linear modules use
NORM_KEYS = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
             "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}
NON_MODEL_PREFIXES = ("optimizer.", "rng_state")


def locate(name: str) -> tuple[str, int | None]:
    """(checkpoint key, layer index or None) of the megatron parameter `name`."""
    if not name.startswith(LAYERS):
        return name, None
    index, rest = name[len(LAYERS):].split(".", 1)
    return LAYERS + NORM_KEYS.get(rest, rest), int(index)


def sharded_tensor(name: str, data: torch.Tensor, num_layers: int):
    """megatron `ShardedTensor` holding `data` (one layer's slice for layer tensors) at TP1/PP1."""
    from megatron.core.dist_checkpointing import ShardedTensor

    key, layer = locate(name)
    if layer is None:
        return ShardedTensor.from_rank_offsets(key, data, replica_id=0)
    return ShardedTensor.from_rank_offsets(key, data, (0, layer, num_layers), replica_id=0, prepend_axis_num=1)


def extra_state_objects(names, num_layers: int) -> dict:
    """The empty `_extra_state` objects megatron's linear layers checkpoint (loading requires them)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    modules = sorted({n.rsplit(".", 1)[0] for n in names if n.startswith(LAYERS) and ".linear_" in n})
    objects = {}
    for module in modules:
        key, layer = locate(f"{module}._extra_state")
        objects[f"{module}._extra_state"] = ShardedObject(key, None, (num_layers,), (layer,), replica_id=0)
    return objects


def stored_tensors(iteration_dir: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Model tensor keys of a checkpoint -> (global shape, dtype); optimizer state and RNG left out."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(str(iteration_dir)).read_metadata().state_dict_metadata
    return {key: (tuple(value.size), value.properties.dtype) for key, value in metadata.items()
            if isinstance(value, TensorStorageMetadata) and not key.startswith(NON_MODEL_PREFIXES)}


def load_tensors(iteration_dir: Path, wanted: dict[str, tuple[tuple[int, ...], torch.dtype]], num_layers: int,
                 prefix: str = ""):
    """{megatron name: tensor} for `wanted` {name: (shape of this name's slice, dtype)}, stored under
    `prefix` + key (NeMo's `module.`); reads those bytes only, through megatron's torch_dist load
    strategy (not `dist_checkpointing.load`, which would also unpickle the checkpoint's common.pt)."""
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy

    templates = {}
    for name, (shape, dtype) in wanted.items():
        key, layer = locate(name)
        if layer is None:
            templates[name] = ShardedTensor.from_rank_offsets(prefix + key, torch.empty(shape, dtype=dtype), replica_id=0)
        else:  # one [1, ...] block of the [layers, ...] tensor (a prepended axis would claim every layer locally)
            templates[name] = ShardedTensor.from_rank_offsets(prefix + key, torch.empty((1, *shape), dtype=dtype),
                                                              (0, layer, num_layers), replica_id=0)
    loaded = TorchDistLoadShardedStrategy().load(templates, Path(iteration_dir))
    return {name: tensor if locate(name)[1] is None else tensor[0] for name, tensor in loaded.items()}


def publish_streamed(entries: list[Entry], num_layers: int, out_dir: Path, meta: dict, desc: str,
                     progress: bool = True) -> None:
    """Write `entries` as iteration 0 of the model-only checkpoint `out_dir`: staged, fsynced, then
    published with `meta` (a conversion's source, dtype, family, model_kind), with a progress bar."""
    from tqdm import tqdm

    from stepwise.checkpoint import layout
    from stepwise.parallel.runtime import init_parallel

    init_parallel(1, 1)
    bar = tqdm(total=len(entries), desc=desc, unit="tensor", disable=not progress)
    staged = layout.staging_dir(out_dir, 0)
    save_streamed(entries, num_layers, staged, on_tensor=lambda n: bar.update())
    bar.close()
    layout.fsync_tree(staged)
    layout.publish(out_dir, 0, {"step": 0, "saved_at": time.time(), "has_optimizer": False, "tp": 1, "pp": 1, **meta})


@dataclass(frozen=True)
class Entry:
    """One megatron tensor to write: its name, shape, dtype and how to make it when asked."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]


def save_streamed(entries: list[Entry], num_layers: int, directory: Path,
                  on_tensor: Callable[[int], None] = lambda n: None) -> None:
    """Write `entries` as the `model` of a dist checkpoint in `directory`, making each tensor only when
    the writer reaches it (`on_tensor(bytes)` is called after each)."""
    from megatron.core import dist_checkpointing

    sharded, by_chunk = {}, {}
    for entry in entries:
        placeholder = sharded_tensor(entry.name, torch.empty(entry.shape, dtype=entry.dtype, device="meta"), num_layers)
        sharded[entry.name] = placeholder
        by_chunk[(placeholder.key, tuple(placeholder.global_offset))] = entry
    sharded.update(extra_state_objects([e.name for e in entries], num_layers))
    dist_checkpointing.save({"model": sharded}, str(directory), sharded_strategy=_lazy_strategy(by_chunk, on_tensor))


def _lazy_strategy(by_chunk: dict, on_tensor: Callable[[int], None]):
    """megatron's torch_dist save strategy, writing through torch's synchronous single-thread writer
    with a planner that makes each tensor on request (megatron's own writer stages all of them first)."""
    from megatron.core.dist_checkpointing.strategies.torch import (MCoreSavePlanner, TorchDistSaveShardedStrategy,
                                                                   _replace_state_dict_keys_with_sharded_keys,
                                                                   mcore_to_pyt_state_dict)
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.checkpoint.planner import WriteItemType

    class LazyPlanner(MCoreSavePlanner):
        def resolve_data(self, item):
            if item.type == WriteItemType.BYTE_IO:
                return super().resolve_data(item)
            entry = by_chunk[(item.index.fqn, tuple(item.index.offset))]
            tensor = entry.produce()
            if tuple(tensor.shape) != entry.shape or tensor.dtype != entry.dtype:
                raise ValueError(f"'{entry.name}': made {tuple(tensor.shape)} {tensor.dtype}, "
                                 f"planned {entry.shape} {entry.dtype}")
            on_tensor(tensor.numel() * tensor.element_size())
            return tensor.contiguous().view(item.tensor_data.chunk.sizes)

    class LazyTorchDist(TorchDistSaveShardedStrategy):
        def save(self, sharded_state_dict, checkpoint_dir):
            flat, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, True)
            # one thread, no copy-ahead: the serial loader, so one tensor is made at a time on CUDA hosts too
            writer = FileSystemWriter(str(checkpoint_dir), thread_count=1, single_file_per_rank=True,
                                      per_thread_copy_ahead=0)
            dcp_save(mcore_to_pyt_state_dict(flat, False), storage_writer=writer,
                     planner=LazyPlanner(dedup_replicated_tensors=False, flatten_state_dict=False))

    return LazyTorchDist("torch_dist", 1)

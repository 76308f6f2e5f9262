"""A megatron dist checkpoint (torch_dist format) read and written tensor by tensor, with no model.

Megatron names (`decoder.layers.3.input_layernorm.weight`) map to checkpoint keys the way
megatron-core's own `sharded_state_dict()` maps them (tested against it): layer tensors are one
global tensor per key with the layer index as a prepended axis, and the local spec's norms use the
Transformer Engine names (`self_attention.linear_qkv.layer_norm_weight`) and every TE module gets an
empty `_extra_state` object (its FP8 state), so a checkpoint loads into either spec at any TP/PP.
Writing resolves each tensor lazily, when torch.distributed.checkpoint's writer asks for it, so
host memory holds one tensor at a time; reading loads the tensors of one
layer, in this process alone (no collective). Writing needs a process group, as megatron's own save
does: with W ranks, each writes the tensors of its contiguous range of layers into its own file
(`stepwise.convert.ranks`), the tensors stored are the same as with one, and rank 0 publishes.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from stepwise.convert import ranks

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


def layer_group(name: str, num_layers: int) -> int:
    """Where `name` sits in reading and splitting order: 0 the embedding, 1 + i decoder layer i,
    num_layers + 1 the rest (final norm, output layer, value head)."""
    key, layer = locate(name)
    if layer is not None:
        return layer + 1
    return 0 if key.startswith("embedding.") else num_layers + 1


def sharded_tensor(name: str, data: torch.Tensor, num_layers: int):
    """megatron `ShardedTensor` holding `data` (one layer's slice for layer tensors) at TP1/PP1."""
    from megatron.core.dist_checkpointing import ShardedTensor

    key, layer = locate(name)
    if layer is None:
        return ShardedTensor.from_rank_offsets(key, data, replica_id=0)
    return ShardedTensor.from_rank_offsets(key, data, (0, layer, num_layers), replica_id=0, prepend_axis_num=1)


def extra_state_modules(names, num_layers: int) -> list[str]:
    """The modules of megatron tensors `names` (a checkpoint's, or one writer rank's share of it) whose
    `_extra_state` a model asks for at load: every Transformer Engine module of the TE layer spec in each layer (`te_spec.te_module_paths`:
    the fused layernorm-linears, the linears and the fused attention), which include the local spec's
    linear layers, and TE's final norm when the checkpoint has a final norm."""
    from stepwise.models.te_spec import FINAL_NORM, te_module_paths

    layers = sorted({layer for layer in (locate(n)[1] for n in names) if layer is not None})
    modules = [f"{LAYERS}{layer}.{path}" for layer in layers for path in te_module_paths()]
    return modules + ([FINAL_NORM] if f"{FINAL_NORM}.weight" in names else [])


def extra_state_objects(names, num_layers: int) -> dict:
    """The empty `_extra_state` objects of `extra_state_modules` (an empty one is what TE and megatron
    load as "no FP8 state yet"), keyed as megatron's `sharded_state_dict()` keys them, so the
    checkpoint loads into the local or the TE spec; a model that does not ask for one ignores it."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    objects = {}
    for module in extra_state_modules(names, num_layers):
        key, layer = locate(f"{module}._extra_state")
        shape, offset = ((num_layers,), (layer,)) if layer is not None else ((1,), (0,))
        objects[f"{module}._extra_state"] = ShardedObject(key, None, shape, offset, replica_id=0)
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
    planner (not `dist_checkpointing.load`, which would also unpickle the checkpoint's common.pt)."""
    from megatron.core.dist_checkpointing import ShardedTensor

    templates = {}
    for name, (shape, dtype) in wanted.items():
        key, layer = locate(name)
        if layer is None:
            templates[name] = ShardedTensor.from_rank_offsets(prefix + key, torch.empty(shape, dtype=dtype), replica_id=0)
        else:  # one [1, ...] block of the [layers, ...] tensor (a prepended axis would claim every layer locally)
            templates[name] = ShardedTensor.from_rank_offsets(prefix + key, torch.empty((1, *shape), dtype=dtype),
                                                              (0, layer, num_layers), replica_id=0)
    loaded = _read_alone(templates, Path(iteration_dir))
    return {name: tensor if locate(name)[1] is None else tensor[0] for name, tensor in loaded.items()}


def _read_alone(templates: dict, directory: Path) -> dict:
    """{name: tensor} of flat `templates` {name: ShardedTensor}, read by megatron's torch_dist planner
    in this process alone (`no_dist`): ranks converting different layers read at their own pace."""
    from megatron.core.dist_checkpointing.strategies.torch import (MCoreLoadPlanner,
                                                                   _replace_sharded_keys_with_state_dict_keys,
                                                                   _replace_state_dict_keys_with_sharded_keys,
                                                                   _unwrap_pyt_sharded_tensor, mcore_to_pyt_state_dict)
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint import load as dcp_load

    by_key, flat_mapping, rename_mapping = _replace_state_dict_keys_with_sharded_keys(templates)
    state = mcore_to_pyt_state_dict(by_key, True)
    with warnings.catch_warnings():  # torch warns that no_dist means "a single process": that is the intent
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp_load(state, storage_reader=FileSystemReader(str(directory)), planner=MCoreLoadPlanner(), no_dist=True)
    unwrapped = {key: _unwrap_pyt_sharded_tensor(value) for key, value in state.items()}
    return _replace_sharded_keys_with_state_dict_keys(unwrapped, flat_mapping, rename_mapping)


def publish_streamed(entries: list[Entry], num_layers: int, out_dir: Path, meta: dict, desc: str,
                     progress: bool = True) -> None:
    """Write `entries` as iteration 0 of the model-only checkpoint `out_dir`: staged, fsynced, then
    published with `meta` (a conversion's source, dtype, family, model_kind), with a progress bar.

    Collective over the default process group: every rank passes the same `entries` and writes its
    share (`rank_share`); each checksums the files it wrote, and rank 0 publishes."""
    from tqdm import tqdm

    from stepwise.checkpoint import layout
    from stepwise.parallel.runtime import init_parallel

    init_parallel(1, 1)
    rank, world_size = ranks.world()
    mine = rank_share(entries, num_layers, rank, world_size)
    staged = ranks.on_rank_zero(lambda: layout.staging_dir(out_dir, 0))
    bar = tqdm(total=len(mine), desc=desc, unit="tensor", disable=not progress or rank != 0)
    save_streamed(mine, num_layers, staged, on_tensor=lambda n: bar.update())
    bar.close()
    checksums = _checksum_own_files(staged, rank, world_size)

    def publish():
        layout.fsync_tree(staged)  # the data files are already synced by their writers (FileSystemWriter)
        layout.publish(out_dir, 0, {"step": 0, "saved_at": time.time(), "has_optimizer": False, "tp": 1, "pp": 1,
                                    **meta}, checksums)

    ranks.on_rank_zero(publish)


def rank_share(entries: list[Entry], num_layers: int, rank: int, world_size: int) -> list[Entry]:
    """The entries rank `rank` of `world_size` writes: a contiguous run of reading groups (embedding,
    layers, rest) balanced by bytes; all of them for one rank."""
    weights = [0] * (num_layers + 2)
    for entry in entries:
        weights[layer_group(entry.name, num_layers)] += torch.Size(entry.shape).numel() * entry.dtype.itemsize
    owners = ranks.contiguous_split(weights, world_size)
    return [entry for entry in entries if owners[layer_group(entry.name, num_layers)] == rank]


def _checksum_own_files(staged: Path, rank: int, world_size: int) -> dict[str, str]:
    """Collective: {file: CRC-32} of every file in `staged`, each file read by the rank that wrote it."""
    from stepwise.checkpoint import layout

    own = [name for name in layout.file_sizes(staged) if layout.writer_rank(name, world_size) == rank]
    merged: dict[str, str] = {}
    for part in ranks.gather(layout.file_checksums(staged, own)):
        merged.update(part)
    return merged


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

"""A megatron checkpoint (conversion or training, any TP/PP, with or without optimizer state; a
policy or a critic) -> an HF directory: safetensors (sharded past `--max-shard-size`, with an index)
+ config.json + tokenizer files + generation_config.json, loadable by `AutoModelForCausalLM` (a
critic: `AutoModelForTokenClassification`, num_labels=1) / `AutoTokenizer` and servable by vLLM.

Streamed: no model is built; the checkpoint is read one layer at a time and each tensor is written
straight into its shard, so host memory holds about one layer. Config and tokenizer come from the
checkpoint's `hf/` directory, or from `--hf-template DIR`. `--part value_network` exports the separate
value network of a DQO / DRO checkpoint (as a critic) instead of its policy.

Called on every rank of a launched step, the export's files (planned as for one process) are split
over the ranks in contiguous runs, so each rank reads a contiguous range of layers and writes whole
files; each rank checks the CRC-32s of a share of the checkpoint's files; rank 0 writes config.json,
generation_config.json and, last, the index. File names and bytes do not depend on the number of
ranks; the file is the grain of the split (`--max-shard-size`: a one-file export uses one rank).

    python conversion/megatron_to_hf.py --ckpt DIR --out DIR [--hf-template DIR] [--dtype D] [--max-shard-size 5GB]
                                        [--part model|value_network]
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from stepwise.checkpoint import layout
from stepwise.convert import dist_io, ranks
from stepwise.convert.hf_to_megatron import peak_rss_mb
from stepwise.convert.mapping import MappingError, hf_shapes, pairs, to_hf_tensors
from stepwise.convert.safetensors_out import (DEFAULT_MAX_SHARD_SIZE, ShardPlan, TensorSpec, begin_export,
                                              finish_export, plan_files, write_files)
from stepwise.convert.tables import rules_for
from stepwise.data.jsonl import atomic_write_json
from stepwise.models.builder import DTYPES
from stepwise.models.hf_config import arch_from_hf_dict
from stepwise.models.policy_value import VALUE_NETWORK_PREFIX, VALUE_PREFIXES
from stepwise.parallel.agree import rank_symmetric


# parts a causal-LM export leaves out, by the checkpoint's model_kind (DQO's value head or value network)
DROPPED_HEADS = {"policy_value": VALUE_PREFIXES}


def saved_dtype(meta: dict, hf_config: dict) -> str:
    """The dtype a checkpoint was written in: its meta (conversion, training), else the HF config."""
    return meta.get("dtype") or hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"


def generation_config(hf_meta: Path, hf_config: dict) -> dict:
    """The source generation_config.json (if any), with the tokenizer's eos / pad / bos ids added.

    The tokenizer's eos joins the eos list rather than replacing it (Qwen2.5-Instruct stops on two ids).
    """
    file = hf_meta / "generation_config.json"
    generation = json.loads(file.read_text()) if file.is_file() else {"do_sample": False}
    ids = {key: hf_config.get(key) for key in ("eos_token_id", "pad_token_id", "bos_token_id")}
    if any((hf_meta / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        from stepwise.tasks.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(hf_meta)
        for key in ids:
            value = getattr(tokenizer, key)
            ids[key] = value if value is not None else ids[key]
    for key, value in ids.items():
        if value is None:
            continue
        current = generation.get(key)
        if current is None:
            generation[key] = value
        elif key == "eos_token_id" and value not in (current if isinstance(current, list) else [current]):
            generation[key] = (current if isinstance(current, list) else [current]) + [value]
    return generation


def _groups(triples, num_layers: int) -> list[list]:
    """(rule, hf names, megatron name) grouped for reading: the embedding, each layer, then the rest."""
    groups: list[list] = [[] for _ in range(num_layers + 2)]
    for triple in triples:
        groups[dist_io.layer_group(triple[2], num_layers)].append(triple)
    return [group for group in groups if group]


def check_stored_keys(triples, stored: dict, iteration: Path, num_layers: int, dropped: tuple[str, ...]) -> None:
    expected = set()
    for _, _, name in triples:
        key, layer = dist_io.locate(name)
        if key not in stored:
            raise MappingError(f"megatron checkpoint {iteration} is missing '{name}' (key '{key}')")
        if layer is not None and stored[key][0][0] != num_layers:
            raise MappingError(f"'{key}' holds {stored[key][0][0]} layers; config.json says {num_layers}")
        expected.add(key)
    unknown = sorted(key for key in set(stored) - expected if not key.startswith(dropped))
    if unknown:
        raise MappingError(f"megatron checkpoint has keys no rule maps: {unknown[:5]} ({len(unknown)} in all)")


def _write_config(out_dir: Path, hf_meta: Path, hf_config: dict, dtype: str, critic: bool) -> None:
    for name in layout.TOKENIZER_FILES:
        if (hf_meta / name).is_file():
            shutil.copyfile(hf_meta / name, out_dir / name)
    config = dict(hf_config, dtype=dtype, torch_dtype=dtype)  # transformers 5 reads dtype; vLLM / 4.x torch_dtype
    if critic:  # a value model: HF *ForTokenClassification with one label
        prefix = hf_config.get("architectures", ["Qwen2ForCausalLM"])[0].replace("ForCausalLM", "").replace("ForTokenClassification", "")
        config.update(architectures=[f"{prefix}ForTokenClassification"], num_labels=1,
                      id2label={"0": "value"}, label2id={"value": 0})
    atomic_write_json(out_dir / "config.json", config)
    atomic_write_json(out_dir / "generation_config.json", generation_config(hf_meta, hf_config))


def convert_megatron_to_hf(ckpt_dir: str | Path, out_dir: str | Path, dtype: str | None = None,
                           hf_template: str | Path | None = None, max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
                           progress: bool = True, part: str = "model") -> dict:
    """Convert; returns a summary (tensors and bytes written, files, seconds, dtype, peak RSS).
    `part="value_network"` exports DQO's separate value network of a policy_value checkpoint instead
    (as a critic: *ForTokenClassification), its config from `ROOT/value_network/hf`.

    Collective when launched with several ranks (torchrun, srun): every rank calls it with the same
    arguments and writes its share of the files; all return once the export is complete."""
    from stepwise.parallel.runtime import init_parallel

    began = time.perf_counter()
    out_dir = Path(out_dir)
    if part not in ("model", "value_network"):
        raise ValueError(f"part {part!r} is not 'model' or 'value_network'")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    init_parallel(1, 1)
    source = _Source(ckpt_dir, part, hf_template)
    dtype = dtype or saved_dtype(source.meta, source.hf_config)
    groups = _groups(source.triples, source.arch.num_layers)
    plan = plan_files([TensorSpec(hf_name, shape, DTYPES[dtype]) for group in groups for triple in group
                       for hf_name, shape in source.hf_specs(triple)], max_shard_size)
    rank, world_size = ranks.world()
    mine = _files_of(plan, rank, world_size)
    wanted = {spec.name for index in mine for spec in plan.shards[index]}

    def begin():  # config first: an interrupted export then fails to load
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_config(out_dir, source.hf_meta, source.hf_config, dtype, source.critic)
        begin_export(out_dir)

    ranks.on_rank_zero(begin)
    with rank_symmetric():
        tensors = source.tensors(groups, wanted, DTYPES[dtype], progress and rank == 0)
        written = write_files(plan, mine, tensors, out_dir)
    every = ranks.gather(written)
    finished = ranks.on_rank_zero(lambda: _finish(plan, every, out_dir))
    return {"tensors": len(plan.weight_map), "bytes": finished["bytes"], "files": len(finished["files"]),
            "dropped": sorted(key for key in source.stored if key.startswith(source.dropped)),
            "seconds": round(time.perf_counter() - began, 2), "dtype": dtype, "peak_rss_mb": peak_rss_mb(),
            "out": str(out_dir), "ranks": world_size, "rank_files": len(mine)}


def _files_of(plan: ShardPlan, rank: int, world_size: int) -> list[int]:
    """The plan's files rank `rank` writes: a contiguous run, the runs balanced by bytes."""
    owners = ranks.contiguous_split([sum(spec.nbytes for spec in shard) for shard in plan.shards], world_size)
    return [index for index, owner in enumerate(owners) if owner == rank]


def _finish(plan: ShardPlan, written: list[dict[str, str]], out_dir: Path) -> dict:
    """(Rank 0, with every rank's {tensor: file}.) Check that the ranks wrote the plan, then the index."""
    merged = {name: file for part in written for name, file in part.items()}
    if merged != plan.weight_map:
        missing = sorted(set(plan.weight_map) - set(merged))
        raise RuntimeError(f"{out_dir}: the ranks did not write the planned export (missing {missing[:5]})")
    return finish_export(plan, out_dir)


class _Source:
    """A checkpoint's part to export: its meta, HF config and arch, the mapping rules and the stored
    tensors' shapes; checked (files, this rank's share of the CRC-32s, keys) on construction."""

    def __init__(self, ckpt_dir: str | Path, part: str, hf_template: str | Path | None):
        self.prefix = "" if part == "model" else VALUE_NETWORK_PREFIX
        self.iteration = layout.resolve(ckpt_dir)
        self.meta = layout.read_meta(self.iteration)
        self.hf_meta = (Path(hf_template) if hf_template
                        else layout.hf_metadata_dir(self.iteration.parent / part if self.prefix else ckpt_dir))
        self.hf_config = json.loads((self.hf_meta / "config.json").read_text())
        self.arch = arch_from_hf_dict(self.hf_config, source=str(self.hf_meta / "config.json"))
        layout.verify_files(self.iteration, self.meta)
        ranks.verify_checksum_share(self.iteration, self.meta)
        self.critic = self.meta.get("model_kind") == "critic" or bool(self.prefix)
        self.triples = pairs(rules_for(self.arch, value_head=self.critic), self.arch)
        self.stored = {key[len(self.prefix):]: value for key, value in dist_io.stored_tensors(self.iteration).items()
                       if key.startswith(self.prefix)}
        if not self.stored:
            raise MappingError(f"{self.iteration}: no tensors under '{self.prefix}' "
                               "(not a checkpoint with a separate value network)")
        self.dropped = () if self.prefix else DROPPED_HEADS.get(self.meta.get("model_kind"), ())
        check_stored_keys(self.triples, self.stored, self.iteration, self.arch.num_layers, self.dropped)

    def slice_of(self, name: str):
        """(shape, dtype) of this megatron name's part of its stored tensor."""
        key, layer = dist_io.locate(name)
        shape, stored_dtype = self.stored[key]
        return (shape if layer is None else shape[1:]), stored_dtype

    def hf_specs(self, triple) -> list[tuple[str, tuple[int, ...]]]:
        """(HF name, shape) of each HF tensor one (rule, hf names, megatron name) makes."""
        rule, hf_names, name = triple
        return list(zip(hf_names, hf_shapes(rule, self.slice_of(name)[0], self.arch)))

    def tensors(self, groups: list[list], wanted: set[str], dtype, progress: bool):
        """(HF name, tensor) of the `wanted` HF tensors in plan order, reading one group at a time
        and, of it, only the megatron tensors that make a wanted one."""
        from tqdm import tqdm

        bar = tqdm(total=len(groups), desc="megatron -> hf", unit="layer", disable=not progress)
        for group in groups:
            needed = [triple for triple in group if wanted.intersection(triple[1])]
            loaded = dist_io.load_tensors(self.iteration, {name: self.slice_of(name) for _, _, name in needed},
                                          self.arch.num_layers, self.prefix) if needed else {}
            for rule, hf_names, name in needed:
                for hf_name, tensor in zip(hf_names, to_hf_tensors(rule, loaded.pop(name), self.arch)):
                    if hf_name in wanted:
                        yield hf_name, tensor.to(dtype)
            bar.update()
        bar.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="megatron checkpoint -> HF directory (streamed)")
    parser.add_argument("--ckpt", required=True, help="checkpoint root (follows 'latest') or iteration directory")
    parser.add_argument("--out", required=True, help="HF directory to write")
    parser.add_argument("--hf-template", default=None, help="config.json + tokenizer source (default: CKPT/hf)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: the checkpoint's dtype")
    parser.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE, help="e.g. 5GB, 500MB (default 5GB)")
    parser.add_argument("--part", choices=["model", "value_network"], default="model",
                        help="value_network: DQO's separate value network of a dqo/dro checkpoint, as a critic")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    summary = convert_megatron_to_hf(args.ckpt, args.out, args.dtype, args.hf_template, args.max_shard_size,
                                     progress=not args.no_progress, part=args.part)
    print(json.dumps(summary))
    return 0

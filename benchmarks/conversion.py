"""Streaming conversion of a >= 1 GB random Qwen2 checkpoint: HF -> megatron -> HF, each in a fresh process,
then again split over `--ranks` processes (torchrun, each rank a contiguous range of layers).

Prints, per direction and number of ranks, the rate in GB/s beside a plain file copy of the same bytes
measured in the same run (the I/O peer: no converter can beat it), their ratio, and rank 0's peak RSS
growth (above the process baseline with everything imported) divided by the largest layer's bytes: a
streaming converter holds a few layers, a whole-model one grows by the model. The last line is the
speed-up of the split runs (GB/s at `--ranks` over GB/s at 1) per direction. The export is written in
`--max-shard-size` files (the grain of its split: one file is written by one rank).

    python benchmarks/conversion.py [--gb 1.0 --hidden 1536 --dtype bfloat16 --ranks 2 --max-shard-size 100MB --out DIR]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def config(args, layers: int) -> dict:
    return dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=32000, hidden_size=args.hidden,
                intermediate_size=4 * args.hidden, num_hidden_layers=layers, num_attention_heads=args.hidden // 128,
                num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=1e6,
                tie_word_embeddings=False, torch_dtype=args.dtype)


def shapes(hf_config: dict) -> dict[str, tuple[int, ...]]:
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf_config))
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def write_random_hf(args, out: Path) -> tuple[int, int]:
    """A random checkpoint of at least `args.gb` GB in 500 MB shards; returns (bytes, largest layer's bytes)."""
    from safetensors.torch import save_file

    dtype, item = getattr(torch, args.dtype), torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    one = shapes(config(args, 1))
    per_layer = sum(torch.Size(s).numel() for n, s in one.items() if ".layers." in n) * item
    rest = sum(torch.Size(s).numel() for n, s in one.items() if ".layers." not in n) * item
    layers = max(1, -(-int(args.gb * 1e9 - rest) // per_layer))
    hf_config = config(args, layers)
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(hf_config))
    shard, shard_bytes, files, index = {}, 0, [], {}
    generator = torch.Generator().manual_seed(0)

    def flush():
        nonlocal shard, shard_bytes
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        index.update({key: name for key in shard})
        files.append(name)
        shard, shard_bytes = {}, 0

    for name, shape in shapes(hf_config).items():
        shard[name] = (torch.randn(shape, generator=generator) * 0.02).to(dtype)
        shard_bytes += shard[name].numel() * item
        if shard_bytes >= 500e6:
            flush()
    if shard:
        flush()
    total = per_layer * layers + rest
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": index}))
    embedding = hf_config["vocab_size"] * args.hidden * item
    return total, max(per_layer, embedding)


def convert(direction: str, source: Path, out: Path, ranks: int, max_shard_size: str) -> dict:
    """One conversion in fresh processes (this file's --worker mode; torchrun for several ranks): rank
    0's JSON summary."""
    launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                    f"--nproc-per-node={ranks}", f"--master-port={free_port()}"]
    result = subprocess.run([*launcher, __file__, "--worker", direction, str(source), str(out), max_shard_size],
                            cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{direction} at {ranks} ranks failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def worker(direction: str, source: str, out: str, max_shard_size: str) -> None:
    from stepwise.convert.hf_to_megatron import convert_hf_to_megatron, peak_rss_mb
    from stepwise.convert.megatron_to_hf import convert_megatron_to_hf
    from stepwise.parallel.runtime import init_parallel

    layout = init_parallel(1, 1)
    baseline = peak_rss_mb()
    if direction == "hf-to-megatron":
        summary = convert_hf_to_megatron(source, out, progress=False)
    else:
        summary = convert_megatron_to_hf(source, out, max_shard_size=max_shard_size, progress=False)
    if layout.rank == 0:
        print(json.dumps({"baseline_rss_mb": baseline, **summary}))


def row(direction: str, ranks: int, summary: dict, nbytes: int, largest: int, copy_rate: float) -> dict:
    rate = nbytes / 1e9 / summary["seconds"]
    growth = (summary["peak_rss_mb"] - summary["baseline_rss_mb"]) * 2**20
    return {"direction": direction, "ranks": ranks, "GB": round(nbytes / 1e9, 3), "seconds": summary["seconds"],
            "GB/s": round(rate, 3), "copy GB/s": round(copy_rate, 3), "rate / copy": round(rate / copy_rate, 3),
            "peak RSS growth MB": round(growth / 1e6, 1), "largest layer MB": round(largest / 1e6, 1),
            "growth / largest layer": round(growth / largest, 2)}


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--ranks", type=int, default=2, help="processes of the split runs (torchrun)")
    parser.add_argument("--max-shard-size", default="100MB", help="the export's file size (both runs)")
    parser.add_argument("--out", default=None, help="scratch directory (default: a temporary one)")
    args = parser.parse_args()
    scratch = Path(args.out or tempfile.mkdtemp(prefix="stepwise-conversion-"))
    try:
        nbytes, largest = write_random_hf(args, scratch / "hf")
        began = time.perf_counter()
        shutil.copytree(scratch / "hf", scratch / "copy")
        copy_rate = nbytes / 1e9 / (time.perf_counter() - began)
        rows = []
        for ranks in (1, args.ranks):
            for direction, source, target in (("hf-to-megatron", scratch / "hf", scratch / f"megatron{ranks}"),
                                              ("megatron-to-hf", scratch / "megatron1", scratch / f"back{ranks}")):
                summary = convert(direction, source, target, ranks, args.max_shard_size)
                rows.append(row(direction, ranks, summary, nbytes, largest, copy_rate))
        for line in rows:
            print(json.dumps(line))
        rate = {(line["direction"], line["ranks"]): line["GB/s"] for line in rows}
        speed_up = {direction: round(rate[direction, args.ranks] / rate[direction, 1], 3)
                    for direction in ("hf-to-megatron", "megatron-to-hf")}
        print(json.dumps({f"speed-up at {args.ranks} ranks": speed_up}))
    finally:
        if args.out is None:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:])
    else:
        main()

"""The `stepwise eval` subcommand: its arguments (defaults from BenchmarkEvalConfig) and what it prints.

    stepwise eval MODEL_DIR [MODEL_DIR ...] --benchmark NAME=PATH [--benchmark ...] --out DIR
        [--field [NAME.]ROLE=KEY ...] [--backend hf|vllm] [--max-tokens N] [--limit N] [--replicas N] ...
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields as dataclass_fields
from pathlib import Path

from stepwise.config.schema import BenchmarkEvalConfig


def add_eval_parser(commands) -> None:
    """Register `eval` on the `stepwise` subcommand parsers."""
    from stepwise.data.benchmarks import FORMATS

    defaults = BenchmarkEvalConfig()
    parser = commands.add_parser("eval", help="greedy zero-shot accuracy / pass@1 of exported HF models on "
                                 "math and code benchmarks")
    parser.add_argument("models", nargs="+", help="exported HF model directories (several: a comparison table)")
    parser.add_argument("--benchmark", action="append", required=True, metavar="NAME=PATH",
                        help=f"a benchmark file (JSONL or parquet); NAME one of {', '.join(sorted(FORMATS))}")
    parser.add_argument("--field", action="append", default=[], metavar="[NAME.]ROLE=KEY",
                        help="read ROLE (problem, answer, id, ...) from KEY, for benchmark NAME or for all")
    parser.add_argument("--out", required=True, help="output directory (a rerun continues what it holds)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N problems of each benchmark")
    parser.add_argument("--backend", choices=("hf", "vllm"), default=defaults.backend)
    parser.add_argument("--launcher", choices=("torchrun", "srun"), default=defaults.launcher)
    for option in ("max_tokens", "batch_size", "shard_size", "replicas", "tensor_parallel_size"):
        parser.add_argument(f"--{option.replace('_', '-')}", type=int, default=getattr(defaults, option))


def parse_benchmarks(specs: list[str], field_specs: list[str]):
    """`BenchmarkFile`s from NAME=PATH and [NAME.]ROLE=KEY strings; ValueError naming a malformed one."""
    from stepwise.data.benchmarks import FORMATS, benchmark_fields
    from stepwise.evaluate.run import BenchmarkFile

    def split(text: str, what: str) -> tuple[str, str]:
        left, sep, right = text.partition("=")
        if not sep or not left or not right:
            raise ValueError(f"--{what} {text!r}: expected {'NAME=PATH' if what == 'benchmark' else '[NAME.]ROLE=KEY'}")
        return left, right

    pairs = [split(spec, "benchmark") for spec in specs]
    overrides: dict[str, dict[str, str]] = {name: {} for name, _ in pairs}
    for spec in field_specs:
        target, key = split(spec, "field")
        name, _, role = target.rpartition(".")
        if name and name not in overrides:
            raise ValueError(f"--field {spec!r}: benchmark '{name}' is not among --benchmark {sorted(overrides)}")
        targets = [name] if name else [each for each in overrides if role in FORMATS[each].fields]
        if not targets:
            raise ValueError(f"--field {spec!r}: no benchmark given reads a field '{role}'")
        for each in targets:
            overrides[each][role] = key
    result = []
    for name, path in pairs:
        if name not in FORMATS:
            raise ValueError(f"--benchmark {name}={path}: unknown benchmark; known: {', '.join(sorted(FORMATS))}")
        benchmark_fields(name, overrides[name])  # an unknown role is an error here, before any loading
        result.append(BenchmarkFile(name, Path(path), overrides[name]))
    return result


def main(args: argparse.Namespace) -> int:
    from stepwise.data.jsonl import DataError
    from stepwise.evaluate.run import evaluate_models
    from stepwise.evaluate.tables import results_table

    names = {item.name for item in dataclass_fields(BenchmarkEvalConfig)}
    settings = BenchmarkEvalConfig(**{key: value for key, value in vars(args).items() if key in names})
    try:
        benchmarks = parse_benchmarks(args.benchmark, args.field)
        rows = evaluate_models(args.models, benchmarks, args.out, settings, args.limit)
    except (DataError, ValueError) as error:
        print(f"stepwise: error: {error}", file=sys.stderr)
        return 2
    print(results_table(rows, [benchmark.name for benchmark in benchmarks]))
    out = Path(args.out)
    print(f"[stepwise] per-sample results: {out}/<model>/<benchmark>/samples.jsonl; table: {out / 'comparison.md'}")
    return 0

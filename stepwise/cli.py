"""The `stepwise` command.

    stepwise run RECIPE.yaml [key=value ...]        run every stage (finished ones are skipped)
    stepwise stage NAME RECIPE.yaml [key=value ...] re-run one stage (its inputs must be finished)
    stepwise plan RECIPE.yaml [key=value ...]       validate and print the resolved recipe and stages
    stepwise convert hf-to-megatron|megatron-to-hf|nemo-to-megatron ARGS...
    stepwise spread RUN_DIR RUN_DIR ... [--out FILE]  accuracy mean/std across seeds
"""
from __future__ import annotations

import argparse
import sys
import warnings

CONVERTERS = {"hf-to-megatron": "hf_to_megatron", "megatron-to-hf": "megatron_to_hf", "nemo-to-megatron": "nemo_import"}


def _quiet() -> None:
    for category in (UserWarning, FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)


def _load(args):
    from stepwise.config import load_recipe

    return load_recipe(args.recipe, args.overrides)


def main(argv: list[str] | None = None) -> int:
    _quiet()
    parser = argparse.ArgumentParser(prog="stepwise", description="Step-level offline RL recipes on megatron-core.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("run", "run a recipe"), ("plan", "validate a recipe and print what would run")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("recipe")
        sub.add_argument("overrides", nargs="*", help="key=value overrides")
    one = commands.add_parser("stage", help="re-run one stage of a recipe")
    one.add_argument("name")
    one.add_argument("recipe")
    one.add_argument("overrides", nargs="*")
    convert = commands.add_parser("convert", help="HF <-> megatron checkpoint conversion; NeMo 2 -> megatron")
    convert.add_argument("direction", choices=sorted(CONVERTERS))
    convert.add_argument("rest", nargs=argparse.REMAINDER)
    spread = commands.add_parser("spread", help="accuracy spread across runs (seeds) of one recipe")
    spread.add_argument("run_dirs", nargs="+")
    spread.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    from stepwise.config import ConfigError

    if args.command == "spread":
        from stepwise.pipeline.spread import main as spread_main

        return spread_main(args.run_dirs, args.out)

    try:
        if args.command == "convert":
            from importlib import import_module

            return import_module(f"stepwise.convert.{CONVERTERS[args.direction]}").main(args.rest)
        config = _load(args)
    except ConfigError as error:
        print(f"stepwise: error: {error}", file=sys.stderr)
        return 2
    from stepwise.pipeline.runner import label, run_pipeline, stage_plan

    if args.command == "plan":
        from stepwise.config import to_yaml

        print(to_yaml(config))
        print("stages:", " -> ".join(label(*instance) for instance in stage_plan(config)))
        if config.run.seeds:
            print("seeds:", ", ".join(map(str, config.run.seeds)), f"(each in {config.run.dir}/seed_<s>)")
        return 0
    from stepwise.train.guard import Requeue

    only, force = ([args.name], True) if args.command == "stage" else (None, False)
    try:
        if config.run.seeds:
            from stepwise.pipeline.seeds import run_seeds

            report = run_seeds(config, only, force)
        else:
            report = run_pipeline(config, only, force).run_dir / "report.md"
    except Requeue as stop:  # workers saved on a signal or deadline: the same command continues
        print(f"[stepwise] {stop}; exit {stop.code}: run the same command again to continue", file=sys.stderr)
        return int(stop.code)
    if report.exists():
        print(f"[stepwise] report: {report}")
        print(f"[stepwise] report (JSON): {report.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The `stepwise` command.

    stepwise run RECIPE.yaml [key=value ...]        run every stage (finished ones are skipped)
    stepwise stage NAME RECIPE.yaml [key=value ...] re-run one stage (its inputs must be finished)
    stepwise plan RECIPE.yaml [key=value ...]       validate; print the resolved recipe, the stages and the
        [--gpu-mem GB] [--gpus-per-node N]          per-GPU memory of each job with a verdict (stepwise/plan/)
        [--model-config PATH] [--critic-config PATH]
    stepwise convert hf-to-megatron|megatron-to-hf|nemo-to-megatron ARGS...
    stepwise spread RUN_DIR RUN_DIR ... [--out FILE]  accuracy mean/std across seeds
    stepwise eval MODEL_DIR ... --benchmark NAME=PATH ... --out DIR  benchmark accuracy (stepwise/evaluate/)
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
    """The recipe, and the planner's notes on model configs standing in for paths missing here (plan only)."""
    from stepwise.config import load_recipe

    if args.command != "plan":
        return load_recipe(args.recipe, args.overrides), []
    from stepwise.plan import stand_ins

    found = stand_ins(args.recipe, args.overrides, args.model_config, args.critic_config)
    return load_recipe(args.recipe, args.overrides + found.overrides), found.notes


def _print_plan(config, args, notes: list[str]) -> int:
    """The memory table of `stepwise plan`; exit 2 when no model architecture can be read."""
    from stepwise.plan import GPU_MEMORY_GIB, Hardware, PlanError, assess, render, resolve_models

    for note in notes:
        print(f"note: {note}")
    hardware = Hardware(args.gpu_mem or GPU_MEMORY_GIB, args.gpus_per_node)
    try:
        models = resolve_models(config)
    except PlanError as error:
        print(f"stepwise: error: {error}", file=sys.stderr)
        return 2
    print(render(assess(config, hardware, models), models, hardware))
    return 0


def _refused(config, force: bool) -> bool:
    """`stepwise run`'s memory check before the first stage: True, having said why, when a job does not fit."""
    from stepwise.plan import check_before_run

    if force:
        print("[stepwise] memory plan skipped (--force)", flush=True)
        return False
    allowed, message = check_before_run(config)
    print(message if allowed else f"stepwise: error: {message}", file=sys.stdout if allowed else sys.stderr, flush=True)
    return not allowed


def main(argv: list[str] | None = None) -> int:
    _quiet()
    parser = argparse.ArgumentParser(prog="stepwise", description="Step-level offline RL recipes on megatron-core.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("run", "run a recipe"), ("plan", "validate a recipe and print what would run")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("recipe")
        sub.add_argument("overrides", nargs="*", help="key=value overrides")
    commands.choices["run"].add_argument("--force", action="store_true", help="run even if the memory plan says "
                                         "a stage does not fit")
    plan = commands.choices["plan"]
    plan.add_argument("--gpu-mem", type=float, default=None, metavar="GB", help="memory per GPU (GiB; default 80)")
    plan.add_argument("--gpus-per-node", type=int, default=None, metavar="N",
                      help="GPUs per node (default: each layout's nproc_per_node)")
    plan.add_argument("--model-config", default=None, metavar="PATH",
                      help="the policy's config.json (file or directory) when model.path is not on this machine")
    plan.add_argument("--critic-config", default=None, metavar="PATH",
                      help="config.json of skywork_dapo.critic_init / dqo_data.value_init when not on this machine")
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
    from stepwise.evaluate.cli import add_eval_parser

    add_eval_parser(commands)
    args, extra = parser.parse_known_args(argv)  # overrides may follow flags: plan RECIPE --gpu-mem 24 k=v
    stray = [item for item in extra if item.startswith("-") or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides += extra

    from stepwise.config import ConfigError

    if args.command == "spread":
        from stepwise.pipeline.spread import main as spread_main

        return spread_main(args.run_dirs, args.out)
    if args.command == "eval":
        from stepwise.evaluate.cli import main as eval_main

        return eval_main(args)

    try:
        if args.command == "convert":
            from importlib import import_module

            return import_module(f"stepwise.convert.{CONVERTERS[args.direction]}").main(args.rest)
        config, notes = _load(args)
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
        return _print_plan(config, args, notes)
    if args.command == "run" and _refused(config, args.force):
        return 2
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
    print(f"[stepwise] driver peak RSS: {driver_peak_rss_mib():.1f} MiB (its steps' workers not included)")
    return 0


def driver_peak_rss_mib() -> float:
    """This process's own peak resident memory (Linux reports KiB): flat in the data size, since every
    stage that touches per-sample data runs in launched steps."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == "__main__":
    sys.exit(main())

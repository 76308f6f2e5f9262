"""Entry point of one training process (launched by torchrun / srun, one per GPU or CPU worker).

    python -m stepwise.train.worker --recipe RESOLVED.yaml --section sft --data D.jsonl \
        --tokenizer DIR --init CKPT --out CKPT_ROOT

Loads the resolved recipe, starts the parallel runtime, builds the engine, loads the initial weights
(unless resuming from OUT), and runs the loop with the section's loss plugin. Exit status: 0 done;
75 (`train.guard.REQUEUE_EXIT_CODE`) saved and stopped on SIGUSR1/SIGTERM or `max_wall_minutes`,
run the same command again to continue; anything else is an error (docs/reliability.md).
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from functools import partial
from pathlib import Path

from stepwise.checkpoint import layout as ckpt_layout


DATA_MODULES = {"sft": "sft_data", "values": "value_data", "action": "action_data",
                "trajectory": "trajectory_data", "pair": "pair_data", "labelled": "labelled_data"}


def build_batches(kind: str, records: list[dict], tokenizer, config, train, source: str, *,
                  where: list[str] | None = None, screen=None):
    """The batch builder for a plugin's `data_kind` (`stepwise.train.<module>.build_batches`); `where`
    (`path:line` per record) and a lenient `screen` (data.records.RecordScreen) let over-long samples
    be reported by line and skipped where the builder supports it."""
    if kind not in DATA_MODULES:
        raise ValueError(f"no batch builder for data kind '{kind}'; known: {sorted(DATA_MODULES)}")
    module = importlib.import_module(f"stepwise.train.{DATA_MODULES[kind]}")
    return module.build_batches(records, tokenizer, config, train, source, where=where, screen=screen)


def load_start_weights(engine, model_kind: str, init: str, value_init: str | None, log: bool) -> None:
    """A fresh run's weights: everything from `init`, except the parts a checkpoint of another kind lacks
    (a critic's value head, DQO's value head or network), which start fresh; a separate value network
    takes its trunk from `value_init`."""
    from stepwise.checkpoint.state import load_checkpoint, unwrap
    from stepwise.models.critic import is_head_key
    from stepwise.models.policy_value import is_value_key

    def kind_of(path):
        return ckpt_layout.read_meta(ckpt_layout.resolve(path)).get("model_kind", "policy")

    def say(message):
        if log:
            print(f"[stepwise] {message}", flush=True)

    same_kind = kind_of(init) == model_kind
    fresh = None if same_kind else {"critic": is_head_key, "policy_value": is_value_key}.get(model_kind)
    load_checkpoint(init, engine.model, skip=fresh)
    network = getattr(unwrap(engine.model), "value_network", None)
    if network is not None and not same_kind:
        critic = kind_of(value_init) == "critic"
        load_checkpoint(value_init, network, skip=None if critic else is_head_key)
        say(f"policy from {init}; value network from {value_init}" + ("" if critic else ", its head freshly initialised"))
    elif fresh is not None:
        say(f"{model_kind} trunk from {init}; value head freshly initialised")
    engine.optimizer.reload_model_params()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", required=True, help="resolved recipe YAML")
    parser.add_argument("--section", default="sft", help="the recipe's train section to run")
    parser.add_argument("--data", required=True, help="training records (JSONL)")
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--init", required=True, help="checkpoint with the initial weights (and hf/config.json)")
    parser.add_argument("--out", required=True, help="checkpoint root to write (and resume from)")
    parser.add_argument("--max-steps", type=int, default=None, help="override the section's max_steps")
    parser.add_argument("--value-init", default=None,
                        help="checkpoint the separate value network of dqo/dro starts from (default: --init)")
    args = parser.parse_args(argv)

    from stepwise import losses
    from stepwise.config.loader import load_resolved
    from stepwise.data.records import RecordScreen, read_records
    from stepwise.models.hf_config import arch_from_hf
    from stepwise.parallel.agree import rank_symmetric
    from stepwise.parallel.runtime import init_parallel, shutdown
    from stepwise.tasks.tokenizer import load_tokenizer
    from stepwise.train.batches import length_multiple
    from stepwise.train.engine import build_engine
    from stepwise.train.loop import run_training, total_steps

    config = load_resolved(Path(args.recipe).read_text())
    train = getattr(config, args.section)
    if args.max_steps is not None:
        train.max_steps = args.max_steps
    plugin = losses.get(train.loss)
    options = plugin.parse_options(train.loss_args)
    parallel = config.layout_for(args.section)
    layout = init_parallel(parallel.tp, parallel.pp, seed=config.run.seed)
    screen = RecordScreen(train.data_errors, train.max_bad_fraction)
    with rank_symmetric():  # an input error on one rank stops every rank here, before training starts
        hf_dir = ckpt_layout.hf_metadata_dir(args.init)
        arch = arch_from_hf(hf_dir)
        tokenizer = load_tokenizer(args.tokenizer)
        records, where, count = read_records(args.data, plugin.data_kind, screen)
        batches = build_batches(plugin.data_kind, records, tokenizer, config, train, args.data, where=where, screen=screen)
        batches.length_multiple = length_multiple(config.model, parallel)  # FP8's GEMMs need more than the default
        screen.finish(count, args.data)
        value_init, value_arch = None, None
        if plugin.model_kind == "policy_value" and config.dqo_data.value_model == "separate":
            value_init = args.value_init or args.init
            value_arch = arch_from_hf(ckpt_layout.hf_metadata_dir(value_init))
    engine = build_engine(arch, config.model, parallel, train, layout, total_steps(train, batches, config.run.seed),
                          kind=plugin.model_kind, value_arch=value_arch)
    out = Path(args.out)
    if ckpt_layout.latest_iteration(out) is None:
        load_start_weights(engine, plugin.model_kind, args.init, value_init, layout.is_logging_rank)
        if layout.rank == 0:
            ckpt_layout.save_hf_metadata(out, json.loads((hf_dir / "config.json").read_text()), hf_dir)
            if value_init:  # the separate value network's own config, for `megatron_to_hf --part value_network`
                value_hf = ckpt_layout.hf_metadata_dir(value_init)
                ckpt_layout.save_hf_metadata(out / "value_network", json.loads((value_hf / "config.json").read_text()),
                                             value_hf)
    meta = {"section": args.section, "loss": train.loss, "dtype": config.model.dtype, "model_kind": plugin.model_kind,
            "tp": layout.tp, "pp": layout.pp, "dp": layout.dp, "init": str(args.init),
            **({"value_init": str(value_init)} if value_init else {})}
    run_training(engine, batches, partial(plugin.compute, options), train, out, config.run.seed, meta, desc=args.section)
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Entry point of one training process (launched by torchrun / srun, one per GPU or CPU worker).

    python -m stepwise.train.worker --recipe RESOLVED.yaml --section sft --data D.jsonl \
        --tokenizer DIR --init CKPT --out CKPT_ROOT

Loads the resolved recipe, starts the parallel runtime, builds the engine, loads the initial weights
(unless resuming from OUT), and runs the loop with the section's loss plugin.
"""
from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

from stepwise.checkpoint import layout as ckpt_layout


def build_batches(kind: str, records: list[dict], tokenizer, config, train, source: str):
    """The batch builder for a plugin's `data_kind`."""
    if kind == "sft":
        from stepwise.train.sft_data import SFTBatches, tokenize_sft

        sequences = tokenize_sft(records, tokenizer, config.model.max_seq_len, source)
        return SFTBatches(sequences, tokenizer.pad_token_id, config.model.max_seq_len, train.micro_batch_size)
    if kind == "values":
        from stepwise.train.value_data import ValueBatches, tokenize_states

        sequences = tokenize_states(records, tokenizer, config.model.max_seq_len, source=source)
        return ValueBatches(sequences, tokenizer.pad_token_id, config.model.max_seq_len, train.micro_batch_size)
    if kind == "action":
        from stepwise.train.action_data import ActionBatches, tokenize_actions

        sequences = tokenize_actions(records, tokenizer, config.model.max_seq_len, source=source)
        return ActionBatches(sequences, tokenizer.pad_token_id, config.model.max_seq_len, train.micro_batch_size)
    raise ValueError(f"no batch builder for data kind '{kind}'")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", required=True, help="resolved recipe YAML")
    parser.add_argument("--section", default="sft", help="the recipe's train section to run")
    parser.add_argument("--data", required=True, help="training records (JSONL)")
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--init", required=True, help="checkpoint with the initial weights (and hf/config.json)")
    parser.add_argument("--out", required=True, help="checkpoint root to write (and resume from)")
    parser.add_argument("--max-steps", type=int, default=None, help="override the section's max_steps")
    args = parser.parse_args(argv)

    from stepwise import losses
    from stepwise.checkpoint.state import load_checkpoint
    from stepwise.config.loader import load_resolved
    from stepwise.data.jsonl import read_jsonl
    from stepwise.models.critic import is_head_key
    from stepwise.models.hf_config import arch_from_hf
    from stepwise.parallel.runtime import init_parallel, shutdown
    from stepwise.tasks.tokenizer import load_tokenizer
    from stepwise.train.engine import build_engine
    from stepwise.train.loop import run_training, total_steps

    config = load_resolved(Path(args.recipe).read_text())
    train = getattr(config, args.section)
    if args.max_steps is not None:
        train.max_steps = args.max_steps
    plugin = losses.get(train.loss)
    options = plugin.parse_options(train.loss_args)
    layout = init_parallel(config.parallel.tp, config.parallel.pp, seed=config.run.seed)
    hf_dir = ckpt_layout.hf_metadata_dir(args.init)
    arch = arch_from_hf(hf_dir)
    tokenizer = load_tokenizer(args.tokenizer)
    records = read_jsonl(args.data)
    batches = build_batches(plugin.data_kind, records, tokenizer, config, train, args.data)
    engine = build_engine(arch, config.model, config.parallel, train, layout, total_steps(train, batches, config.run.seed),
                          kind=plugin.model_kind)
    out = Path(args.out)
    if ckpt_layout.latest_iteration(out) is None:
        init_kind = ckpt_layout.read_meta(ckpt_layout.resolve(args.init)).get("model_kind", "policy")
        fresh_head = plugin.model_kind == "critic" and init_kind != "critic"
        load_checkpoint(args.init, engine.model, skip=is_head_key if fresh_head else None)
        if fresh_head and layout.is_logging_rank:
            print(f"[stepwise] critic trunk from {args.init}; value head freshly initialised", flush=True)
        engine.optimizer.reload_model_params()
        if layout.rank == 0:
            ckpt_layout.save_hf_metadata(out, json.loads((hf_dir / "config.json").read_text()), hf_dir)
    meta = {"section": args.section, "loss": train.loss, "dtype": config.model.dtype, "model_kind": plugin.model_kind,
            "tp": layout.tp, "pp": layout.pp, "dp": layout.dp}
    run_training(engine, batches, partial(plugin.compute, options), train, out, config.run.seed, meta, desc=args.section)
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

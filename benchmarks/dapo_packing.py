"""Skywork DAPO policy stage, shared-prefix packed vs one row per (state, action) padded to the batch
maximum, on a synthetic data set shaped like the paper's: solutions x steps states, each with up to
16 unique actions, a prompt of ~300 tokens and steps of ~60. Same model, same samples, same global
batches, one process, measured in alternating rounds. Reports tokens per epoch (computed: rows x
padded length; and real: without padding) and the policy-stage step time; ends with one JSON line.

    python benchmarks/dapo_packing.py [--solutions 6 --steps 12 --actions 16 --prompt 300 --step 60]
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time
import warnings
from functools import cache, partial

warnings.filterwarnings("ignore")


def synthetic_records(args) -> list[dict]:
    """Token records: per solution, state t = prompt + its first t steps; 1..`actions` unique next
    steps of `step` +-25% tokens each, random advantages and reference log-probs."""
    rng = random.Random(0)
    token = lambda: rng.randrange(3, args.vocab)  # noqa: E731
    prompt = [token() for _ in range(args.prompt)]
    records = []
    for solution in range(args.solutions):
        steps = [[token() for _ in range(rng.randint(3 * args.step // 4, 5 * args.step // 4))] for _ in range(args.steps)]
        for t in range(args.steps):
            state = prompt + [i for s in steps[:t] for i in s]
            for _ in range(rng.randint(max(1, args.actions // 4), args.actions)):
                action = [token() for _ in range(rng.randint(3 * args.step // 4, 5 * args.step // 4))]
                records.append({"ids": state + action, "mask": [0] * len(state) + [1] * len(action),
                                "state": f"{solution}/{t}", "advantage": rng.gauss(0, 0.05), "ref_logp": -rng.random() * 50})
    return records


def epoch_tokens(batches, order) -> tuple[int, int]:
    """(computed, real) tokens of one epoch: every micro-batch's rows x length, and `batches.tokens`."""
    computed = real = 0
    for _ in range(order.steps_per_epoch):
        indices = order.next_global_batch()
        computed += sum(m["input_ids"].numel() for m in batches.micro_batches(indices, 0, 1))
        real += batches.tokens(indices)
    return computed, real


@cache
def single_process_layout():
    """TP 1, PP 1 in this process (initialised once, however many engines are built)."""
    from stepwise.parallel.runtime import init_parallel

    return init_parallel(1, 1, seed=0)


def alternating_step_seconds(args, loss: str, forms: dict) -> dict[str, list[float]]:
    """Seconds of `args.rounds` optimizer steps of `loss` per form of `forms` (name -> batch builder) on a
    tiny qwen2 model (`args.vocab`, `args.hidden`, `args.layers`), the same global batch alternately in
    each form after an untimed one in each, so both share whatever else loads the machine."""
    from stepwise import losses
    from stepwise.config.schema import ModelConfig, ParallelConfig, TrainConfig
    from stepwise.models.hf_config import arch_from_hf_dict
    from stepwise.train.engine import build_engine

    layout = single_process_layout()
    arch = arch_from_hf_dict(dict(model_type="qwen2", vocab_size=args.vocab, hidden_size=args.hidden,
                                  num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                                  intermediate_size=4 * args.hidden, max_position_embeddings=args.max_seq_len))
    train = TrainConfig(loss=loss, global_batch_size=args.global_batch, micro_batch_size=args.micro_batch)
    engine = build_engine(arch, ModelConfig(max_seq_len=args.max_seq_len), ParallelConfig(), train, layout, 1000)
    plugin = losses.get(loss)
    loss_fn = partial(plugin.compute, plugin.parse_options({}))
    order = next(iter(forms.values())).make_order(args.global_batch, seed=0)
    steps = [order.next_global_batch() for _ in range(min(args.rounds, order.steps_per_epoch))]
    seconds: dict[str, list[float]] = {name: [] for name in forms}
    for batches in forms.values():  # a first step in each form, untimed (allocations, optimizer state)
        engine.train_step(batches.micro_batches(steps[0], 0, 1), loss_fn)
    for indices in steps:  # the same global batch, alternately in both forms
        for name, batches in forms.items():
            began = time.perf_counter()
            engine.train_step(batches.micro_batches(indices, 0, 1), loss_fn)
            seconds[name].append(time.perf_counter() - began)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in [("solutions", 6), ("steps", 12), ("actions", 16), ("prompt", 300), ("step", 60),
                          ("vocab", 512), ("hidden", 128), ("layers", 2), ("global_batch", 32), ("micro_batch", 4),
                          ("max_seq_len", 2048), ("rounds", 2)]:
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    args = parser.parse_args()

    from stepwise.train.action_data import ActionBatches

    records = synthetic_records(args)
    forms = {name: ActionBatches(records, 0, args.max_seq_len, args.micro_batch, pack=name == "packed")
             for name in ("unpacked", "packed")}
    tokens = {name: epoch_tokens(b, b.make_order(args.global_batch, seed=0)) for name, b in forms.items()}
    seconds = alternating_step_seconds(args, "skywork_dapo", forms)
    for name in forms:
        print(f"{name:9s} tokens/epoch computed {tokens[name][0]:>10,} real {tokens[name][1]:>10,}  "
              f"step {statistics.mean(seconds[name]):.2f} s (steps: {', '.join(f'{s:.2f}' for s in seconds[name])})")
    ratio = lambda key, at: at(key["packed"]) / at(key["unpacked"])  # noqa: E731
    print(json.dumps({
        "records": len(records), "states": len({r["state"] for r in records}), "global_batch": args.global_batch,
        "tokens_ratio": round(ratio(tokens, lambda t: t[0]), 4), "real_tokens_ratio": round(ratio(tokens, lambda t: t[1]), 4),
        "step_time_ratio": round(ratio(seconds, statistics.mean), 4),
        "unpacked_step_s": round(statistics.mean(seconds["unpacked"]), 3),
        "packed_step_s": round(statistics.mean(seconds["packed"]), 3)}))


if __name__ == "__main__":
    main()

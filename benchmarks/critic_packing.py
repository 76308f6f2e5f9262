"""The critic stage's training step, solutions sequence-packed (`train.pack_sequences`,
`stepwise.train.value_packing`) vs one row per solution padded to the batch maximum.

The data is synthetic value records shaped like the paper's:
- `--prompts` problems x `--solutions` solutions each;
- a prompt of `--prompt` tokens +-50%, then `--min-steps` to `--steps` steps of `--step` tokens +-25%;
- every state read at its last token, with a random MC value.

Same model, same global batches, one process, alternating steps (`dapo_packing.alternating_step_seconds`).
Reported: tokens per epoch, computed (rows x padded length) and real (without padding), and the step
time. What packing saves here is the unpacked batch's padding. Ends with one JSON line.

    python benchmarks/critic_packing.py [--prompts 16 --solutions 6 --min-steps 1 --steps 12 --prompt 300 --step 60]
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import warnings

from dapo_packing import alternating_step_seconds, epoch_tokens

warnings.filterwarnings("ignore")


def critic_records(args) -> list[dict]:
    """Token-form value records (as `value_data.tokenize_states` leaves them): ids, state read positions, MC targets."""
    rng = random.Random(0)
    token = lambda: rng.randrange(3, args.vocab)  # noqa: E731
    step_length = lambda: rng.randint(3 * args.step // 4, 5 * args.step // 4)  # noqa: E731
    records = []
    for _ in range(args.prompts):
        prompt = [token() for _ in range(rng.randint(args.prompt // 2, 3 * args.prompt // 2))]
        for _ in range(args.solutions):
            ids, ends = list(prompt), [len(prompt)]
            for _ in range(rng.randint(args.min_steps, args.steps)):
                ids += [token() for _ in range(step_length())]
                ends.append(len(ids))
            ends = ends[:-1]  # states: the prompt, then the prompt and each step but the last
            records.append({"ids": ids, "positions": [end - 1 for end in ends], "targets": [rng.random() for _ in ends]})
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in [("prompts", 16), ("solutions", 6), ("min_steps", 1), ("steps", 12), ("prompt", 300), ("step", 60),
                          ("vocab", 512), ("hidden", 128), ("layers", 2), ("global_batch", 32), ("micro_batch", 4),
                          ("max_seq_len", 2048), ("rounds", 3)]:
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    args = parser.parse_args()

    from stepwise.train.value_data import ValueBatches

    records = critic_records(args)
    forms = {name: ValueBatches(records, 0, args.max_seq_len, args.micro_batch, pack=name == "packed")
             for name in ("unpacked", "packed")}
    tokens = {name: epoch_tokens(b, b.make_order(args.global_batch, seed=0)) for name, b in forms.items()}
    seconds = alternating_step_seconds(args, "critic_bce", forms, kind="critic")
    for name in forms:
        print(f"{name:9s} tokens/epoch computed {tokens[name][0]:>10,} real {tokens[name][1]:>10,}  "
              f"step {statistics.mean(seconds[name]):.2f} s (steps: {', '.join(f'{s:.2f}' for s in seconds[name])})")
    ratio = lambda key, at: at(key["packed"]) / at(key["unpacked"])  # noqa: E731
    print(json.dumps({
        "records": len(records), "states": sum(len(r["targets"]) for r in records), "global_batch": args.global_batch,
        "tokens_ratio": round(ratio(tokens, lambda t: t[0]), 4), "real_tokens_ratio": round(ratio(tokens, lambda t: t[1]), 4),
        "step_time_ratio": round(ratio(seconds, statistics.mean), 4),
        "unpacked_step_s": round(statistics.mean(seconds["unpacked"]), 3),
        "packed_step_s": round(statistics.mean(seconds["packed"]), 3)}))


if __name__ == "__main__":
    main()

"""Tokens per epoch and step time of the `sft`, `pair`, `labelled` and `trajectory` builders, sequence-packed
(`train.pack_sequences`) vs one row per sample padded to the global batch's maximum, on synthetic samples
of mixed lengths (prompts of `prompt` +-50% tokens, responses of 10..`response` tokens; a pair's two
responses share its prompt; kto's responses alternate desirable and not; dqo's carry per-token
rewards and log-probs and train a policy with a value head). Computed tokens are rows x padded length,
real ones leave padding out; step time is the mean of `rounds` optimizer steps (sft / dpo / kto / dqo
loss) of a tiny model, packed and unpacked alternately
on the same global batches in one process. Ends with one JSON line.

    python benchmarks/sequence_packing.py [--samples 512 --prompt 200 --response 600 --max-seq-len 2048]
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import warnings

warnings.filterwarnings("ignore")

from dapo_packing import alternating_step_seconds, epoch_tokens


def response_records(args, rng: random.Random, prompt: list[int]) -> dict:
    response = [rng.randrange(3, 512) for _ in range(rng.randint(10, args.response))]
    return {"ids": prompt + response, "mask": [0] * len(prompt) + [1] * len(response)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in [("samples", 512), ("prompt", 200), ("response", 600), ("max_seq_len", 2048),
                          ("global_batch", 32), ("micro_batch", 4), ("vocab", 512), ("hidden", 128), ("layers", 2),
                          ("rounds", 2)]:
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    args = parser.parse_args()

    from stepwise.train.labelled_data import LabelledBatches
    from stepwise.train.pair_data import PairBatches
    from stepwise.train.sft_data import SFTBatches
    from stepwise.train.trajectory_data import TrajectoryBatches

    rng = random.Random(0)
    prompts = [[rng.randrange(3, 512) for _ in range(rng.randint(args.prompt // 2, 3 * args.prompt // 2))]
               for _ in range(args.samples)]
    sequences = [response_records(args, rng, p) for p in prompts]
    pairs = [{"chosen": response_records(args, rng, p), "rejected": response_records(args, rng, p), "ref_logp": (-1.0, -1.0)}
             for p in prompts]
    labelled = [{**s, "desirable": i % 2 == 0, "ref_logp": -1.0} for i, s in enumerate(sequences)]
    trajectories = [{**s, **{key: [-1.0 if key.endswith("logp") else 0.0] * sum(s["mask"])
                             for key in ("rewards", "behaviour_logp", "ref_logp")}} for s in sequences]
    for trajectory in trajectories:
        trajectory["rewards"][-1] = 1.0
    builders = (("sft", "sft", "policy", lambda pack: SFTBatches(sequences, 0, args.max_seq_len, args.micro_batch, pack)),
                ("pair", "dpo", "policy", lambda pack: PairBatches(pairs, 0, args.max_seq_len, args.micro_batch, pack)),
                ("labelled", "kto", "policy",
                 lambda pack: LabelledBatches(labelled, 0, args.max_seq_len, args.micro_batch, pack)),
                ("trajectory", "dqo", "policy_value",
                 lambda pack: TrajectoryBatches(trajectories, 0, args.max_seq_len, args.micro_batch, pack)))
    figures = {}
    for name, loss, kind, make in builders:
        forms = {"unpacked": make(False), "packed": make(True)}
        tokens = {form: epoch_tokens(b, b.make_order(args.global_batch, seed=0)) for form, b in forms.items()}
        options = {"kl_group_size": args.micro_batch} if loss == "kto" else {}  # a KL group per micro-batch
        steps = alternating_step_seconds(args, loss, forms, kind, options)
        seconds = {form: statistics.mean(s) for form, s in steps.items()}
        for form in forms:
            print(f"{name:10s} {form:8s} tokens/epoch computed {tokens[form][0]:>10,} real {tokens[form][1]:>10,}  "
                  f"step {seconds[form]:.2f} s")
        figures[f"{name}_tokens_ratio"] = round(tokens["packed"][0] / tokens["unpacked"][0], 4)
        figures[f"{name}_real_tokens_ratio"] = round(tokens["packed"][1] / tokens["unpacked"][1], 4)
        figures[f"{name}_step_time_ratio"] = round(seconds["packed"] / seconds["unpacked"], 4)
        figures[f"{name}_step_s"] = {form: round(seconds[form], 3) for form in forms}
    print(json.dumps(figures))


if __name__ == "__main__":
    main()

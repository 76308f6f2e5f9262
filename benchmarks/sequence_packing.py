"""Tokens per epoch of the `sft` and `pair` builders, sequence-packed (`train.pack_sequences`) vs one row
per sample padded to the global batch's maximum, on synthetic samples of mixed lengths (prompts of
`prompt` +-50% tokens, responses of 10..`response` tokens; a pair's two responses share its prompt).
Counts only (no model): computed tokens are rows x padded length, real ones leave padding out. Ends
with one JSON line.

    python benchmarks/sequence_packing.py [--samples 512 --prompt 200 --response 600 --max-seq-len 2048]
"""
from __future__ import annotations

import argparse
import json
import random

from dapo_packing import epoch_tokens


def response_records(args, rng: random.Random, prompt: list[int]) -> dict:
    response = [rng.randrange(3, 512) for _ in range(rng.randint(10, args.response))]
    return {"ids": prompt + response, "mask": [0] * len(prompt) + [1] * len(response)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in [("samples", 512), ("prompt", 200), ("response", 600), ("max_seq_len", 2048),
                          ("global_batch", 32), ("micro_batch", 4)]:
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    args = parser.parse_args()

    from stepwise.train.pair_data import PairBatches
    from stepwise.train.sft_data import SFTBatches

    rng = random.Random(0)
    prompts = [[rng.randrange(3, 512) for _ in range(rng.randint(args.prompt // 2, 3 * args.prompt // 2))]
               for _ in range(args.samples)]
    sequences = [response_records(args, rng, p) for p in prompts]
    pairs = [{"chosen": response_records(args, rng, p), "rejected": response_records(args, rng, p), "ref_logp": (-1.0, -1.0)}
             for p in prompts]
    figures = {}
    for name, make in (("sft", lambda pack: SFTBatches(sequences, 0, args.max_seq_len, args.micro_batch, pack)),
                       ("pair", lambda pack: PairBatches(pairs, 0, args.max_seq_len, args.micro_batch, pack))):
        tokens = {}
        for pack in (False, True):
            batches = make(pack)
            tokens[pack] = epoch_tokens(batches, batches.make_order(args.global_batch, seed=0))
            print(f"{name:4s} {'packed  ' if pack else 'unpacked'} tokens/epoch computed {tokens[pack][0]:>10,} "
                  f"real {tokens[pack][1]:>10,}")
        figures[f"{name}_tokens_ratio"] = round(tokens[True][0] / tokens[False][0], 4)
        figures[f"{name}_real_tokens_ratio"] = round(tokens[True][1] / tokens[False][1], 4)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()

"""Worker: critic scores of fixed `values` records through `score.score_records` (one forward-only
schedule of many micro-batches of different lengths) at TP x PP of one random tiny critic (built and
saved to CKPT at TP 1 PP 1, loaded from it at any other layout): solutions
(several states each), next states one record each, and the same next states as branched records
(one per state, packed). Saves {"solutions", "next_plain", "next_branched": [values per record],
"tokens": (branched, plain)} from the last stage's first rank.

    python -m torch.distributed.run --nproc-per-node=N _scoring_worker.py OUT CKPT TP PP
"""
from __future__ import annotations

import sys

import torch

from stepwise.checkpoint.state import load_checkpoint, save_checkpoint
from stepwise.models.builder import EngineOptions
from stepwise.models.critic import build_critic_model
from stepwise.models.hf_config import arch_from_hf_dict
from stepwise.parallel.runtime import init_parallel
from stepwise.train.score import score_records
from stepwise.train.value_data import ValueBatches, branched_record, tokenize_states
from tests.integration._critic_worker import HF

MAX_SEQ_LEN = 32  # the packed row budget: the third state's branches need two rows


def draw_ids(generator: torch.Generator, length: int) -> list[int]:
    return torch.randint(1, 40, (length,), generator=generator).tolist()


def solution_records(generator: torch.Generator) -> list[dict]:
    """7 solutions of 6..30 tokens with 1..3 states each (micro-batches of 2 differ in length)."""
    records = []
    for length in (6, 30, 11, 17, 25, 8, 21):
        ends = sorted(set(torch.randint(1, length + 1, (3,), generator=generator).tolist()))
        records.append({"ids": draw_ids(generator, length), "ends": ends, "mc": [0.0] * len(ends)})
    return records


def next_states(generator: torch.Generator) -> list[list[list[int]]]:
    """Per state (prefixes of 9, 1, 12 and 5 tokens), the ids of its next states: 1..4 actions of 1..8
    tokens, one repeated (duplicate samples are common)."""
    states = []
    for prefix_len, actions in ((9, 3), (1, 2), (12, 4), (5, 1)):
        prefix = draw_ids(generator, prefix_len)
        branches = [draw_ids(generator, int(torch.randint(1, 9, (1,), generator=generator))) for _ in range(actions)]
        states.append([prefix + branch for branch in branches + branches[:1]])
    return states


def main(out: str, checkpoint: str, tp: int, pp: int) -> None:
    layout = init_parallel(tp, pp, seed=5)
    model = build_critic_model(arch_from_hf_dict(HF), EngineOptions(tp=tp, pp=pp))
    if tp * pp == 1:
        save_checkpoint(checkpoint, 1, model, meta={"model_kind": "critic", "dtype": "float32"})
    else:
        load_checkpoint(checkpoint, model)
    model.eval()
    generator = torch.Generator().manual_seed(0)
    solutions, states = solution_records(generator), next_states(generator)
    plain = [{"ids": ids, "ends": [len(ids)], "mc": [0.0]} for state in states for ids in state]
    branched = [branched_record(state) for state in states]
    result, tokens = {}, []
    for name, records in (("solutions", solutions), ("next_plain", plain), ("next_branched", branched)):
        batches = ValueBatches(tokenize_states(records, None, MAX_SEQ_LEN), 0, MAX_SEQ_LEN, 2)
        indices = list(range(len(records)))
        result[name] = score_records(model, batches, indices, "critic", HF["vocab_size"], layout.device)
        tokens.append(batches.tokens(indices))
    result["tokens"] = (tokens[2], tokens[1])
    if layout.is_last_stage and layout.tp_rank == 0:
        torch.save(result, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))

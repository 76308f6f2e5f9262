"""Worker: `skywork_dapo` gradients and `policy` scores (summed action log-probs, as the advantage
stage stores them) of one fixed state-wise global batch, shared-prefix packed and unpacked, on one
model at TP x PP; saves from rank 0 {"gradient": (observed max |diff|, max |grad|), "score": (max
|diff|, max |score|), "tokens": (packed, unpacked)}, each maximum taken over all ranks.

    python -m torch.distributed.run --nproc-per-node=N _packing_worker.py OUT TP PP
"""
from __future__ import annotations

import sys
from functools import partial

import torch
import torch.distributed as dist

from stepwise.config.schema import ParallelConfig, TrainConfig
from stepwise.parallel.runtime import init_parallel
from stepwise.train.action_data import ActionBatches
from stepwise.train.score import _score_batches
from tests.integration._grad_worker import TINY, engine_for

MAX_SEQ_LEN = 32  # engine_for's ModelConfig: the packed row budget


def state_records(seed: int = 3) -> list[dict]:
    """Token records of 4 states (prefixes of 4..12 tokens, one of a single token) with 1..4 actions
    of 1..8 tokens each; advantages and reference log-probs random."""
    generator = torch.Generator().manual_seed(seed)

    def draw(low: int, high: int) -> int:
        return int(torch.randint(low, high, (1,), generator=generator))

    records = []
    for state, prefix_len in enumerate([9, 1, 12, 4]):
        prefix = torch.randint(1, 40, (prefix_len,), generator=generator).tolist()
        for _ in range(draw(1, 5)):
            action = torch.randint(1, 40, (draw(1, 9),), generator=generator).tolist()
            records.append({"ids": prefix + action, "mask": [0] * prefix_len + [1] * len(action), "state": f"s{state}",
                            "advantage": float(torch.randn(1, generator=generator)) * 0.05,
                            "ref_logp": float(torch.randn(1, generator=generator)) - 20})
    return records


def global_max(value: float) -> float:
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor)


def main(out: str, tp: int, pp: int) -> None:
    layout = init_parallel(tp, pp, seed=7)
    records = state_records()
    indices = list(range(len(records)))
    train = TrainConfig(loss="skywork_dapo", global_batch_size=len(records), micro_batch_size=2)
    plugin, engine = engine_for("skywork_dapo", train, ParallelConfig(tp=tp, pp=pp, nproc_per_node=layout.world_size),
                                layout, 10)
    loss_fn = partial(plugin.compute, plugin.parse_options({}))
    grads, scores, tokens = {}, {}, {}
    for pack in (False, True):
        batches = ActionBatches(records, 0, MAX_SEQ_LEN, train.micro_batch_size, pack=pack)
        micro = batches.micro_batches(indices, layout.dp_rank, layout.dp)
        engine.forward_backward(micro, loss_fn)
        grads[pack] = {name: p.main_grad.detach().clone() for name, p in engine.model.module.named_parameters()}
        engine.model.eval()
        scores[pack] = torch.tensor(_score_batches(engine.model, micro, "policy", TINY["vocab_size"], layout.device))
        tokens[pack] = batches.tokens(indices)
    gradient = max((grads[True][n] - grads[False][n]).abs().max().item() for n in grads[True])
    scale = max(g.abs().max().item() for g in grads[False].values())
    score_diff = (scores[True] - scores[False]).abs().max().item() if layout.is_last_stage else 0.0
    score_scale = scores[False].abs().max().item() if layout.is_last_stage else 0.0
    result = {"gradient": (global_max(gradient), global_max(scale)), "score": (global_max(score_diff), global_max(score_scale)),
              "tokens": (tokens[True], tokens[False]), "scores": len(scores[False]) if layout.is_last_stage else -1}
    if dist.get_rank() == 0:
        torch.save(result, out)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))

"""Worker: gradients of one fixed global batch, packed and unpacked, on one model at TP x PP, for a
CASE: `skywork_dapo` (state-wise `action` batch, shared-prefix packed; also the `policy` scores, summed
action log-probs as the advantage stage stores them), `critic_bce` (sequence-packed `values` batches of
solutions; also the critic's values), `sft`, `dpo`, or `dqo` / `dro` (sequence-packed
`sft` / `pair` / `trajectory` batches; dqo and dro on a policy with a value head, `dqo+network` with a
separate value network), or `kto` (`labelled`
batches packed per micro-batch, KL groups of 2). Saves from rank 0 {"gradient": (observed max |diff|, max |grad|), "score": (max |diff|,
max |score|) or None, "tokens": (packed, unpacked: `batches.tokens`), "computed": (packed, unpacked:
input positions of every DP rank's micro-batches, padding included), "rows": (packed, unpacked
micro-batches of all DP ranks), "core_attention": the first layer's core-attention class, "thd_calls":
how many THD calls its stand-in for TE took (0 for other classes)}, each
maximum taken over all ranks.

    python -m torch.distributed.run --nproc-per-node=N _packing_worker.py OUT TP PP [CASE [TRANSFORMER_IMPL]]

TRANSFORMER_IMPL is `model.transformer_impl`, or `te-stand-in`: the local spec with the core attention
of TE's spec (`tests/te_stand_in.py`), for CPU.
"""
from __future__ import annotations

import sys
from functools import partial

import torch
import torch.distributed as dist

from stepwise.config.schema import ParallelConfig, TrainConfig
from stepwise.parallel.runtime import init_parallel
from stepwise.train.action_data import ActionBatches
from stepwise.train.labelled_data import LabelledBatches
from stepwise.train.pair_data import PairBatches
from stepwise.train.sft_data import SFTBatches
from stepwise.train.score import _score_batches
from stepwise.train.trajectory_data import TrajectoryBatches
from stepwise.train.value_data import ValueBatches
from tests.integration._grad_worker import NETWORK, TINY, engine_for, random_sequences

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


def pair_records(seed: int = 5) -> list[dict]:
    """6 pairs: a chosen and a rejected response (1..10 tokens) to one prompt of 3 tokens; random
    reference log-probs."""
    generator = torch.Generator().manual_seed(seed)
    pairs = []
    for chosen, other in zip(random_sequences(6, seed), random_sequences(6, seed + 1)):
        prompt = chosen["ids"][:3]
        sides = [prompt + s["ids"][3:13] for s in (chosen, other)]
        pairs.append({**{side: {"ids": ids, "mask": [0] * 3 + [1] * (len(ids) - 3)} for side, ids in zip(("chosen", "rejected"), sides)},
                      "ref_logp": tuple((torch.randn(2, generator=generator) - 30).tolist())})
    return pairs


def trajectory_records(seed: int = 6) -> list[dict]:
    """8 trajectories (prompts of 3 tokens, 3..16 response tokens) with random per-token behaviour and
    reference log-probs and rewards."""
    generator = torch.Generator().manual_seed(seed)
    records = []
    for sequence in random_sequences(8, 4):
        n = len(sequence["ids"]) - 3
        numbers = lambda shift: (torch.randn(n, generator=generator) * 0.3 + shift).tolist()  # noqa: E731
        records.append({**sequence, "behaviour_logp": numbers(-3.0), "ref_logp": numbers(-3.0), "rewards": numbers(0.0)})
    return records


def solution_records(seed: int = 8) -> list[dict]:
    """8 token-form critic records (after `value_data.tokenize_states`): 4..20 tokens, 1..4 states read
    at increasing positions (the last at the last token), random MC targets in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    records = []
    for _ in range(8):
        n = int(torch.randint(4, 21, (1,), generator=generator))
        states = int(torch.randint(1, 5, (1,), generator=generator))
        reads = sorted(set(torch.randint(0, n - 1, (states - 1,), generator=generator).tolist())) + [n - 1]
        records.append({"ids": torch.randint(1, 40, (n,), generator=generator).tolist(), "positions": reads,
                        "targets": torch.rand(len(reads), generator=generator).tolist()})
    return records


def batches_of(case: str, micro_batch_size: int, pack: bool):
    """The case's batch object over its fixed samples, packed or not (row budget MAX_SEQ_LEN)."""
    if case == "skywork_dapo":
        return ActionBatches(state_records(), 0, MAX_SEQ_LEN, micro_batch_size, pack=pack)
    if case == "sft":
        return SFTBatches(random_sequences(8, 4), 0, MAX_SEQ_LEN, micro_batch_size, pack=pack)
    if case == "dpo":
        return PairBatches(pair_records(), 0, MAX_SEQ_LEN, micro_batch_size, pack=pack)
    if case in ("dqo", "dro", "dqo" + NETWORK):
        return TrajectoryBatches(trajectory_records(), 0, MAX_SEQ_LEN, micro_batch_size, pack=pack)
    if case == "critic_bce":
        return ValueBatches(solution_records(), 0, MAX_SEQ_LEN, micro_batch_size, pack=pack)
    if case == "kto":
        records = [{**r, "desirable": k % 3 != 0, "ref_logp": -30.0 + k} for k, r in enumerate(random_sequences(8, 4))]
        return LabelledBatches(records, 0, MAX_SEQ_LEN, micro_batch_size, pack=pack)
    raise ValueError(f"no packing case {case}")


def global_max(value: float) -> float:
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor)


def main(out: str, tp: int, pp: int, case: str, transformer_impl: str) -> None:
    if transformer_impl == "te-stand-in":  # CPU: TE's core-attention dispatch in the local spec
        from stepwise.models import builder
        from tests.te_stand_in import stand_in_te_spec

        builder.layer_spec, transformer_impl = stand_in_te_spec(builder.layer_spec), "local"
    layout = init_parallel(tp, pp, seed=7)
    train = TrainConfig(loss=case.removesuffix(NETWORK), global_batch_size=8, micro_batch_size=2)
    parallel = ParallelConfig(tp=tp, pp=pp, nproc_per_node=layout.world_size)
    plugin, engine = engine_for(case, train, parallel, layout, 10, transformer_impl)
    loss_fn = partial(plugin.compute, plugin.parse_options({"kl_group_size": 2} if case == "kto" else {}))
    grads, scores, tokens, rows, computed = {}, {}, {}, {}, {}
    for pack in (False, True):
        batches = batches_of(case, train.micro_batch_size, pack)
        indices = list(range(len(batches)))
        micro = batches.micro_batches(indices, layout.dp_rank, layout.dp)
        assert pack == ("attention_mask" in micro[0]), f"{case}: pack={pack} but the micro-batches disagree"
        engine.forward_backward(micro, loss_fn)
        grads[pack] = {name: p.main_grad.detach().clone() for name, p in engine.model.module.named_parameters()}
        if case in ("skywork_dapo", "critic_bce"):  # the policy's action scores, the critic's values
            engine.model.eval()
            kind = "policy" if case == "skywork_dapo" else "critic"
            read = _score_batches(engine.model, micro, kind, TINY["vocab_size"], layout.device)
            scores[pack] = torch.tensor([value for row in read for value in row])
        every_rank = [m for r in range(layout.dp) for m in batches.micro_batches(indices, r, layout.dp)]
        tokens[pack], rows[pack] = batches.tokens(indices), len(every_rank)
        computed[pack] = sum(m["input_ids"].numel() for m in every_rank)
    gradient = max((grads[True][n] - grads[False][n]).abs().max().item() for n in grads[True])
    scale = max(g.abs().max().item() for g in grads[False].values())
    score = None
    if scores:
        score_diff = (scores[True] - scores[False]).abs().max().item() if layout.is_last_stage else 0.0
        score_scale = scores[False].abs().max().item() if layout.is_last_stage else 0.0
        score = (global_max(score_diff), global_max(score_scale))
    core_attention = engine.model.module.decoder.layers[0].self_attention.core_attention
    result = {"gradient": (global_max(gradient), global_max(scale)), "score": score,
              "tokens": (tokens[True], tokens[False]), "rows": (rows[True], rows[False]),
              "computed": (computed[True], computed[False]),
              "scores": len(scores[False]) if scores and layout.is_last_stage else -1,
              "core_attention": type(core_attention).__name__, "thd_calls": len(getattr(core_attention, "packed", ()))}
    if dist.get_rank() == 0:
        torch.save(result, out)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else "skywork_dapo",
         sys.argv[5] if len(sys.argv) > 5 else "auto")

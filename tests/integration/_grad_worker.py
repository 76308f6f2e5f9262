"""Worker: gradient of one fixed global batch for every loss plugin (`cases`), split as asked; saves
{case: {param: grad}} from rank 0.

    python _grad_worker.py OUT MICRO_BATCH_SIZE          (single process or under torchrun, TP=PP=1)
"""
from __future__ import annotations

import sys
from functools import partial

import torch

from stepwise import losses
from stepwise.config.schema import ModelConfig, ParallelConfig, TrainConfig
from stepwise.models.hf_config import arch_from_hf_dict
from stepwise.parallel.runtime import init_parallel
from stepwise.train.action_data import ActionBatches
from stepwise.train.engine import build_engine
from stepwise.train.labelled_data import LabelledBatches
from stepwise.train.pair_data import PairBatches
from stepwise.train.sft_data import SFTBatches
from stepwise.train.trajectory_data import TrajectoryBatches
from stepwise.train.value_data import ValueBatches

TINY = dict(model_type="qwen2", vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=True)
GLOBAL_BATCH = 4
PROMPT = 3
OPTIONS = {"kto": {"kl_group_size": 1}}  # KTO's reference point is per group; a group of one splits anywhere
VALUE_TINY = dict(TINY, hidden_size=48, intermediate_size=96)  # a separate value network of another width
NETWORK = "+network"  # case suffix: a policy_value plugin with a separate value network (else the value head)


def cases() -> list[str]:
    """Every plugin; the policy_value ones (dqo, dro) with a value head and with a separate network."""
    out = []
    for name in losses.names():
        out += [name, name + NETWORK] if losses.get(name).model_kind == "policy_value" else [name]
    return out


def engine_for(case: str, train: TrainConfig, parallel: ParallelConfig, layout, total: int,
               transformer_impl: str = ModelConfig.transformer_impl):
    """(plugin, engine) of a case over the TINY policy."""
    plugin = losses.get(case.removesuffix(NETWORK))
    value_arch = arch_from_hf_dict(VALUE_TINY) if case.endswith(NETWORK) else None
    model = ModelConfig(max_seq_len=32, transformer_impl=transformer_impl)
    engine = build_engine(arch_from_hf_dict(TINY), model, parallel, train, layout, total,
                          kind=plugin.model_kind, value_arch=value_arch)
    return plugin, engine


def random_sequences(count: int, seed: int, prompt_tokens: int = PROMPT) -> list[dict]:
    """Token records of random length 6..19 whose first `prompt_tokens` tokens are not targets."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        n = int(torch.randint(6, 20, (1,), generator=generator))
        ids = torch.randint(1, 40, (n,), generator=generator).tolist()
        out.append({"ids": ids, "mask": [0] * prompt_tokens + [1] * (n - prompt_tokens)})
    return out


def batches_for(plugin, micro_batch_size: int, count: int = GLOBAL_BATCH):
    """The plugin's batch object over `count` samples of random tokens and numbers."""
    generator = torch.Generator().manual_seed(11)

    def numbers(n: int) -> list[float]:
        return torch.randn(n, generator=generator).tolist()

    sequences = random_sequences(count, 0)
    kind = plugin.data_kind
    if kind == "sft":
        return SFTBatches(sequences, 0, 32, micro_batch_size)
    if kind == "values":
        rows = [{"ids": s["ids"], "positions": [2, 4, len(s["ids"]) - 1],
                 "targets": torch.rand(3, generator=generator).tolist()} for s in sequences]
        return ValueBatches(rows, 0, 32, micro_batch_size)
    if kind == "action":
        rows = [{**s, "state": f"s{i // 2}", "advantage": numbers(1)[0], "ref_logp": numbers(1)[0] - 20}
                for i, s in enumerate(sequences)]
        return ActionBatches(rows, 0, 32, micro_batch_size)
    if kind == "trajectory":
        rows = []
        for s in sequences:
            n = len(s["ids"]) - PROMPT
            rows.append({**s, "rewards": [0.0] * (n - 1) + [1.0], "behaviour_logp": [v - 3 for v in numbers(n)],
                         "ref_logp": [v - 3 for v in numbers(n)]})
        return TrajectoryBatches(rows, 0, 32, micro_batch_size)
    if kind == "pair":
        pairs = [{"chosen": c, "rejected": r, "ref_logp": (numbers(1)[0] - 30, numbers(1)[0] - 30)}
                 for c, r in zip(sequences, random_sequences(count, 1))]
        return PairBatches(pairs, 0, 32, micro_batch_size)
    if kind == "labelled":
        rows = [{**s, "desirable": i % 2 == 0, "ref_logp": numbers(1)[0] - 30} for i, s in enumerate(sequences)]
        return LabelledBatches(rows, 0, 32, micro_batch_size)
    raise ValueError(f"no test batches for data kind {kind}")


def gradients(case: str, micro_batch_size: int) -> dict[str, torch.Tensor]:
    layout = init_parallel(1, 1, seed=7)
    train = TrainConfig(loss=case.removesuffix(NETWORK), global_batch_size=GLOBAL_BATCH, micro_batch_size=micro_batch_size)
    plugin, engine = engine_for(case, train, ParallelConfig(nproc_per_node=layout.world_size), layout, 10)
    micro = batches_for(plugin, micro_batch_size).micro_batches(list(range(GLOBAL_BATCH)), layout.dp_rank, layout.dp)
    engine.forward_backward(micro, partial(plugin.compute, plugin.parse_options(OPTIONS.get(plugin.name, {}))))
    return {param: p.main_grad.detach().clone() for param, p in engine.model.module.named_parameters()}


if __name__ == "__main__":
    grads = {case: gradients(case, int(sys.argv[2])) for case in cases()}
    if torch.distributed.get_rank() == 0:
        torch.save(grads, sys.argv[1])

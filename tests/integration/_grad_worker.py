"""Worker: gradient of one fixed global batch, split as asked; saves {param: grad} from rank 0.

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
from stepwise.train.engine import build_engine
from stepwise.train.sft_data import SFTBatches

TINY = dict(model_type="qwen2", vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=True)
GLOBAL_BATCH = 4


def random_sequences(count: int, seed: int, prompt_tokens: int) -> list[dict]:
    """Token records of random length 6..19 whose first `prompt_tokens` tokens are not targets."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        n = int(torch.randint(6, 20, (1,), generator=generator))
        ids = torch.randint(1, 40, (n,), generator=generator).tolist()
        out.append({"ids": ids, "mask": [0] * prompt_tokens + [1] * (n - prompt_tokens)})
    return out


def gradients(micro_batch_size: int) -> dict[str, torch.Tensor]:
    layout = init_parallel(1, 1, seed=7)
    train = TrainConfig(global_batch_size=GLOBAL_BATCH, micro_batch_size=micro_batch_size)
    parallel = ParallelConfig(nproc_per_node=layout.world_size)
    engine = build_engine(arch_from_hf_dict(TINY), ModelConfig(max_seq_len=32), parallel, train, layout, 10)
    plugin = losses.get("sft")
    batches = SFTBatches(random_sequences(GLOBAL_BATCH, 0, 3), 0, 32, micro_batch_size)
    micro = batches.micro_batches(list(range(GLOBAL_BATCH)), layout.dp_rank, layout.dp)
    engine.forward_backward(micro, partial(plugin.compute, plugin.parse_options({})))
    return {name: p.main_grad.detach().clone() for name, p in engine.model.module.named_parameters()}


if __name__ == "__main__":
    grads = gradients(int(sys.argv[2]))
    if torch.distributed.get_rank() == 0:
        torch.save(grads, sys.argv[1])

"""Worker: train the tiny model with the real loop for STEPS steps into OUT (resuming if OUT has a
checkpoint), then save {param: tensor} of the final model as OUT/final.pt from rank 0.

    python _train_worker.py OUT STEPS TOTAL_STEPS [TP PP]     (single process or under torchrun)
"""
from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import torch

from stepwise import losses
from stepwise.checkpoint.state import unwrap
from stepwise.config.schema import ModelConfig, ParallelConfig, TrainConfig
from stepwise.models.hf_config import arch_from_hf_dict
from stepwise.parallel.runtime import init_parallel
from stepwise.train.engine import build_engine
from stepwise.train.loop import run_training
from stepwise.train.sft_data import SFTBatches
from tests.integration._grad_worker import TINY, random_sequences


def main(out: str, steps: int, total: int, tp: int = 1, pp: int = 1) -> None:
    layout = init_parallel(tp, pp, seed=11)
    train = TrainConfig(global_batch_size=8, micro_batch_size=2, max_steps=total, save_every=2, log_every=1)
    train.optim.lr = 1e-3
    parallel = ParallelConfig(tp=tp, pp=pp, nproc_per_node=layout.world_size)
    engine = build_engine(arch_from_hf_dict(TINY), ModelConfig(max_seq_len=32), parallel, train, layout, total)
    plugin = losses.get("sft")
    train.max_steps = steps  # stop early (as a preempted job would); the schedule still spans `total`
    run_training(engine, SFTBatches(random_sequences(64, 1, 2), 0, 32, 2), partial(plugin.compute, plugin.parse_options({})),
                 train, out, seed=5, meta={})
    if layout.rank == 0:
        torch.save({k: v.detach().clone() for k, v in unwrap(engine.model).state_dict().items() if torch.is_tensor(v)},
                   Path(out) / "final.pt")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *map(int, sys.argv[4:]))

"""Worker: train the tiny model with the real loop for STEPS steps into OUT (resuming if OUT has a
checkpoint), then save {param: tensor} of the final model as OUT/final.pt from rank 0. With LOSSES
(comma-separated `_grad_worker.cases`, e.g. dqo+network) each trains its own model in OUT/<case>/ on
random data of its kind.

    python _train_worker.py OUT STEPS TOTAL_STEPS [TP PP [LOSSES]]     (single process or under torchrun)

With ASYNC_SAVE=1 in the environment, the periodic checkpoints are saved asynchronously.
"""
from __future__ import annotations

import os
import sys
from functools import partial
from pathlib import Path

import torch

from stepwise.checkpoint.state import unwrap
from stepwise.config.schema import ParallelConfig, TrainConfig
from stepwise.parallel.runtime import init_parallel
from stepwise.train.loop import run_training
from stepwise.train.sft_data import SFTBatches
from tests.integration._grad_worker import NETWORK, OPTIONS, batches_for, engine_for, random_sequences

ASYNC_SAVE_ENV = "ASYNC_SAVE"


def train_one(out: Path, steps: int, total: int, layout, tp: int, pp: int, loss: str | None) -> None:
    """`loss` None: the original SFT run on 64 sequences; else the plugin on 32 samples of its data kind."""
    case = loss or "sft"
    train = TrainConfig(loss=case.removesuffix(NETWORK), global_batch_size=8, micro_batch_size=2, max_steps=total,
                        save_every=2, log_every=1, async_save=os.environ.get(ASYNC_SAVE_ENV) == "1")
    train.optim.lr = 1e-3
    parallel = ParallelConfig(tp=tp, pp=pp, nproc_per_node=layout.world_size)
    plugin, engine = engine_for(case, train, parallel, layout, total)
    batches = SFTBatches(random_sequences(64, 1, 2), 0, 32, 2) if loss is None else batches_for(plugin, 2, count=32)
    train.max_steps = steps  # stop early (as a preempted job would); the schedule still spans `total`
    options = plugin.parse_options(OPTIONS.get(plugin.name, {}))
    run_training(engine, batches, partial(plugin.compute, options), train, out, seed=5, meta={})
    if layout.rank == 0:
        torch.save({k: v.detach().clone() for k, v in unwrap(engine.model).state_dict().items() if torch.is_tensor(v)},
                   Path(out) / "final.pt")


def main(out: str, steps: int, total: int, tp: int = 1, pp: int = 1, names: str = "") -> None:
    layout = init_parallel(tp, pp, seed=11)
    if not names:
        train_one(Path(out), steps, total, layout, tp, pp, None)
    for loss in filter(None, names.split(",")):
        train_one(Path(out) / loss, steps, total, layout, tp, pp, loss)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *map(int, sys.argv[4:6]), *sys.argv[6:7])

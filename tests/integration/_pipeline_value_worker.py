"""Worker: DQO's loss, metrics and global gradient norm on one fixed batch, with the same weights at
PP 1 (which writes them to CKPT/<case>) and PP 2 (which loads them); saves JSON from the last stage.

    python _pipeline_value_worker.py OUT CKPT PP          (PP 2: under torchrun with 2 processes)
"""
from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path

import torch.distributed as dist

from stepwise.checkpoint.state import load_checkpoint, save_checkpoint
from stepwise.config.schema import ParallelConfig, TrainConfig
from stepwise.parallel.runtime import init_parallel
from tests.integration._grad_worker import NETWORK, batches_for, engine_for

CASES = ("dqo" + NETWORK, "dqo")


def measure(case: str, layout, pp: int, ckpt: Path) -> dict:
    train = TrainConfig(loss="dqo", global_batch_size=4, micro_batch_size=2)
    plugin, engine = engine_for(case, train, ParallelConfig(pp=pp, nproc_per_node=layout.world_size), layout, 10)
    if pp == 1:
        save_checkpoint(ckpt, 0, engine.model)
    else:
        load_checkpoint(ckpt, engine.model)
        engine.optimizer.reload_model_params()
    micro = batches_for(plugin, 2).micro_batches(list(range(4)), layout.dp_rank, layout.dp)
    outputs = engine.forward_backward(micro, partial(plugin.compute, plugin.parse_options({"beta": 0.5})))
    engine.optimizer.prepare_grads()
    result = {"grad_norm": float(engine.optimizer.get_grad_norm())}
    for name in ("loss", "value_loss_sum", "policy_loss_sum", "is_weight_sum"):
        result[name] = sum(float(item[engine.metric_names.index(name)]) for item in outputs)
    return result


def main(out: str, ckpt: str, pp: int) -> None:
    layout = init_parallel(1, pp, seed=7)
    results = {case: measure(case, layout, pp, Path(ckpt) / case) for case in CASES}
    if layout.is_last_stage:
        Path(out).write_text(json.dumps(results))
    if dist.is_initialized():
        dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))

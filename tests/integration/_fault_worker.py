"""Worker for the fault-injection tests: the tiny model through the real loop, with a per-rank trace.

    python _fault_worker.py OUT TOTAL_STEPS TAG [--nan-policy skip|stop] [--max-wall MIN] [--save-every N]

Each rank appends one JSON line per step to OUT/TAG_rank<R>.jsonl: the global batch's sample indices,
the step's nonfinite / skipped flags and a digest of this rank's weights after the step. When the run
stops (Requeue or NonFiniteError) the rank writes OUT/TAG_exit_rank<R>.json and re-raises, so the
process exit code is the loop's own. Faults come from the environment (stepwise.parallel.inject).
"""
from __future__ import annotations

import argparse
import hashlib
import json
from functools import partial
from pathlib import Path

import torch

from stepwise import losses
from stepwise.checkpoint.state import unwrap
from stepwise.config.schema import ModelConfig, ParallelConfig, TrainConfig
from stepwise.models.hf_config import arch_from_hf_dict
from stepwise.parallel.runtime import init_parallel
from stepwise.train.engine import build_engine
from stepwise.train.guard import NonFiniteError, Requeue
from stepwise.train.loop import run_training
from stepwise.train.sft_data import SFTBatches
from tests.integration._grad_worker import TINY, random_sequences

SAMPLES, GLOBAL_BATCH, SEED = 64, 8, 5


class RecordingBatches(SFTBatches):
    """SFT batches that remember the last global batch they were asked for."""

    last_indices: list[int] = []

    def micro_batches(self, indices, dp_rank, dp_size):
        self.last_indices = list(indices)
        return super().micro_batches(indices, dp_rank, dp_size)


def digest(model) -> str:
    hasher = hashlib.sha1()
    for name, tensor in sorted(unwrap(model).state_dict().items()):
        if torch.is_tensor(tensor):
            hasher.update(tensor.detach().contiguous().numpy().tobytes())
    return hasher.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("total", type=int)
    parser.add_argument("tag")
    parser.add_argument("--nan-policy", default="skip")
    parser.add_argument("--max-wall", type=float, default=None)
    parser.add_argument("--save-every", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    layout = init_parallel(1, 1, seed=11)
    train = TrainConfig(global_batch_size=GLOBAL_BATCH, micro_batch_size=2, max_steps=args.total, log_every=1,
                        save_every=args.save_every, nan_policy=args.nan_policy, max_wall_minutes=args.max_wall)
    train.optim.lr = 1e-3
    parallel = ParallelConfig(nproc_per_node=layout.world_size)
    engine = build_engine(arch_from_hf_dict(TINY), ModelConfig(max_seq_len=32), parallel, train, layout, args.total)
    plugin = losses.get("sft")
    batches = RecordingBatches(random_sequences(SAMPLES, 1, 2), 0, 32, 2)
    trace = out / f"{args.tag}_rank{layout.rank}.jsonl"
    out.mkdir(parents=True, exist_ok=True)

    def on_step(metrics: dict) -> None:
        row = {"step": metrics["step"], "dp": layout.dp, "indices": batches.last_indices,
               "nonfinite": metrics["nonfinite"], "skipped": metrics["skipped"], "digest": digest(engine.model)}
        with trace.open("a") as handle:
            handle.write(json.dumps(row) + "\n")

    try:
        run_training(engine, batches, partial(plugin.compute, plugin.parse_options({})), train, out, seed=SEED,
                     meta={}, on_step=on_step)
    except (Requeue, NonFiniteError) as stop:
        (out / f"{args.tag}_exit_rank{layout.rank}.json").write_text(
            json.dumps({"kind": type(stop).__name__, "message": str(stop)}))
        raise


if __name__ == "__main__":
    main()

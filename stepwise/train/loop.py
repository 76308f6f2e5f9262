"""The one training loop: data order, steps, metrics (JSONL + tqdm on one rank), checkpoints, resume.

It knows nothing about any particular loss: the loss plugin and the batch builder come in. A
batch builder has `make_order(global_batch_size, seed)` (the resumable sample order),
`micro_batches(indices, dp_rank, dp_size)` and `tokens(indices)`.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from stepwise.checkpoint import layout as ckpt_layout
from stepwise.checkpoint.state import load_checkpoint, save_checkpoint
from stepwise.config.schema import TrainConfig
from stepwise.train.engine import Engine


def total_steps(train: TrainConfig, batches, seed: int) -> int:
    """Optimizer steps of a run: `max_steps`, else `epochs` x the order's steps per epoch."""
    if train.max_steps is not None:
        return train.max_steps
    return max(1, int(train.epochs * batches.make_order(train.global_batch_size, seed).steps_per_epoch))


def _prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` iterations (never the one `latest` names)."""
    latest = ckpt_layout.latest_iteration(root)
    iterations = sorted(p for p in root.glob("iter_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for path in iterations[: max(0, len(iterations) - keep_last)]:
        if latest is None or path.name != latest.name:
            shutil.rmtree(path, ignore_errors=True)


def _save(engine: Engine, root: Path, step: int, order, train: TrainConfig, meta: dict) -> None:
    save_checkpoint(root, step, engine.model, engine.optimizer, engine.scheduler,
                    trainer_state={"step": step, "data_order": order.state_dict()}, meta=meta)
    if engine.layout.rank == 0:
        _prune(root, max(1, train.keep_last))


def run_training(
    engine: Engine,
    batches,
    loss_fn: Callable,
    train: TrainConfig,
    out_dir: str | Path,
    seed: int,
    meta: dict,
    desc: str = "train",
) -> dict:
    """Train to the end (resuming from `out_dir/latest` if present); returns the last step's metrics."""
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    order = batches.make_order(train.global_batch_size, seed)
    steps = total_steps(train, batches, seed)
    start = 0
    if ckpt_layout.latest_iteration(root) is not None:
        state = load_checkpoint(root, engine.model, engine.optimizer, engine.scheduler, load_rng=True)["trainer"]
        start = int(state["step"])
        order.load_state_dict(state["data_order"])
    log_rank = engine.layout.is_logging_rank
    metrics_file = root / "metrics.jsonl"
    progress = tqdm(total=steps, initial=start, desc=desc, disable=not log_rank, dynamic_ncols=True, mininterval=2.0)
    last: dict = {}
    for step in range(start, steps):
        indices = order.next_global_batch()
        began = time.perf_counter()
        metrics = engine.train_step(batches.micro_batches(indices, engine.layout.dp_rank, engine.layout.dp), loss_fn)
        seconds = time.perf_counter() - began
        tokens = batches.tokens(indices)
        last = {"step": step + 1, **metrics, "tokens": tokens, "tokens_per_s": tokens / seconds, "step_s": seconds}
        if log_rank:
            progress.update(1)
            progress.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                                 tok_s=f"{tokens / seconds:,.0f}", refresh=False)
            if (step + 1) % train.log_every == 0 or step + 1 == steps:
                with metrics_file.open("a") as handle:
                    handle.write(json.dumps(last) + "\n")
        if train.save_every and (step + 1) % train.save_every == 0 and step + 1 < steps:
            _save(engine, root, step + 1, order, train, meta)
    progress.close()
    if ckpt_layout.latest_iteration(root) is None or ckpt_layout.read_meta(ckpt_layout.latest_iteration(root))["step"] != steps:
        _save(engine, root, steps, order, train, meta)
    return last

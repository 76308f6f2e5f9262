"""The one training loop: data order, steps, metrics (JSONL + tqdm on one rank), checkpoints, resume.

It knows nothing about any particular loss: the loss plugin and the batch builder come in. A
batch builder has `make_order(global_batch_size, seed)` (the resumable sample order),
`micro_batches(indices, dp_rank, dp_size)` and `tokens(indices)`.

Faults it handles (docs/reliability.md): a non-finite step follows `train.nan_policy` (skip: no
update; stop: save the state before the step, raise NonFiniteError) on every rank alike; SIGUSR1 /
SIGTERM or the `train.max_wall_minutes` deadline make every rank save at the same step boundary and
raise `Requeue` (exit code 75). A resumed run drops metrics lines past its checkpoint, so a crash
between checkpoints leaves no duplicate steps in `metrics.jsonl`.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from stepwise.checkpoint import layout as ckpt_layout
from stepwise.checkpoint.retention import prune
from stepwise.checkpoint.state import load_checkpoint, save_checkpoint
from stepwise.config.schema import TrainConfig
from stepwise.data.jsonl import atomic_write_text
from stepwise.parallel import inject
from stepwise.train.engine import Engine
from stepwise.train.guard import NonFiniteError, Requeue, StopGuard, mark_requeue
from stepwise.train.metric_sinks import MetricSinks


def total_steps(train: TrainConfig, batches, seed: int) -> int:
    """Optimizer steps of a run: `max_steps`, else `epochs` x the order's steps per epoch."""
    if train.max_steps is not None:
        return train.max_steps
    return max(1, int(train.epochs * batches.make_order(train.global_batch_size, seed).steps_per_epoch))


def latest_step(root: Path) -> int | None:
    latest = ckpt_layout.latest_iteration(root)
    return None if latest is None else int(ckpt_layout.read_meta(latest)["step"])


def _save(engine: Engine, root: Path, step: int, order_state: dict, train: TrainConfig, meta: dict,
          counters: dict, saves: "AsyncSaves | None" = None) -> float:
    """Publish iteration `step` (collective), prune on rank 0; returns the seconds it took. With `saves`
    (train.async_save) the shards are written in the background and published at a later step."""
    began = time.perf_counter()
    queue = None
    if saves is not None:
        saves.finish()  # one save in flight at a time
        queue = saves.queue
    save_checkpoint(root, step, engine.model, engine.optimizer, engine.scheduler,
                    trainer_state={"step": step, "data_order": order_state, **counters}, meta=meta,
                    async_queue=queue)
    if queue is None:
        _prune(engine, root, train)
    return time.perf_counter() - began


def _prune(engine: Engine, root: Path, train: TrainConfig) -> None:
    if engine.layout.rank == 0:
        prune(root, max(1, train.keep_last), train.keep_every)


class AsyncSaves:
    """Periodic saves (train.save_every) written by a forked process while training goes on (megatron's
    async save); each is published when its writer is done, checked once per step on every rank (one
    small all-reduce). The stop and final saves stay synchronous: they must be on disk before exit."""

    def __init__(self, engine: Engine, root: Path, train: TrainConfig) -> None:
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self.queue, self.engine, self.root, self.train = AsyncCallsQueue(), engine, root, train

    def poll(self) -> None:
        if self.queue.get_num_unfinalized_calls() and self.queue.maybe_finalize_async_calls(blocking=False):
            _prune(self.engine, self.root, self.train)

    def finish(self) -> None:
        if self.queue.get_num_unfinalized_calls():
            self.queue.maybe_finalize_async_calls(blocking=True)
            _prune(self.engine, self.root, self.train)


def _resume(engine: Engine, root: Path, order) -> tuple[int, dict]:
    """(first step to run, counters) from `root/latest`, or (0, fresh counters)."""
    counters = {"nonfinite_steps": 0}
    if ckpt_layout.latest_iteration(root) is None:
        return 0, counters
    state = load_checkpoint(root, engine.model, engine.optimizer, engine.scheduler, load_rng=True)["trainer"]
    order.load_state_dict(state["data_order"])
    counters["nonfinite_steps"] = int(state.get("nonfinite_steps", 0))
    return int(state["step"]), counters


def _trim_metrics(file: Path, start: int) -> None:
    """Keep only the lines of steps <= `start` (steps after the checkpoint are about to rerun), and
    drop a line a crash cut short."""
    if not file.is_file():
        return
    lines = file.read_text().splitlines()

    def keep(line: str) -> bool:
        try:
            return json.loads(line).get("step", 0) <= start
        except (json.JSONDecodeError, AttributeError):
            return False

    kept = [line for line in lines if keep(line)]
    if len(kept) != len(lines):
        atomic_write_text(file, "".join(line + "\n" for line in kept))


def _say(message: str) -> None:
    print(f"[stepwise] {message}", flush=True)


def run_training(
    engine: Engine,
    batches,
    loss_fn: Callable,
    train: TrainConfig,
    out_dir: str | Path,
    seed: int,
    meta: dict,
    desc: str = "train",
    on_step: Callable[[dict], None] | None = None,
) -> dict:
    """Train to the end (resuming from `out_dir/latest` if present); returns the last step's metrics.

    `on_step(metrics)` is called on every rank after each step. Raises `Requeue` after a stop
    checkpoint (signal or deadline) and `NonFiniteError` under `nan_policy=stop`, on every rank.
    """
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    order = batches.make_order(train.global_batch_size, seed)
    steps = total_steps(train, batches, seed)
    start, counters = _resume(engine, root, order)
    rank, log_rank = engine.layout.rank, engine.layout.is_logging_rank
    metrics_file = root / "metrics.jsonl"
    if log_rank and start:
        _trim_metrics(metrics_file, start)
    progress = tqdm(total=steps, initial=start, desc=desc, disable=not log_rank, dynamic_ncols=True, mininterval=2.0)
    sinks = MetricSinks(root, f"{root.resolve().parent.parent.name}-{desc}", train.tensorboard, meta) if log_rank else None
    saves = AsyncSaves(engine, root, train) if train.async_save else None
    last: dict = {}
    with StopGuard(train.max_wall_minutes) as guard:
        try:
            for step in range(start, steps):
                before = order.state_dict()
                indices = order.next_global_batch()
                began = time.perf_counter()
                micro = batches.micro_batches(indices, engine.layout.dp_rank, engine.layout.dp)
                metrics = engine.train_step(micro, inject.nan_loss(loss_fn, rank, step + 1))
                seconds = time.perf_counter() - began
                guard.record_step(seconds)
                counters["nonfinite_steps"] += int(metrics["nonfinite"])
                tokens = batches.tokens(indices)
                last = {"step": step + 1, **metrics, "nonfinite_total": counters["nonfinite_steps"],
                        "tokens": tokens, "tokens_per_s": tokens / seconds, "step_s": seconds}
                if log_rank:
                    progress.update(1)
                    progress.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                                         tok_s=f"{tokens / seconds:,.0f}", refresh=False)
                    if (step + 1) % train.log_every == 0 or step + 1 == steps or metrics["nonfinite"]:
                        sinks.write(last)
                if on_step is not None:
                    on_step(last)
                if metrics["nonfinite"]:
                    _non_finite(engine, root, step, before, train, meta, counters, last)
                if saves is not None:
                    saves.poll()
                if step + 1 < steps:
                    reason = guard.agreed_reason()
                    if reason:  # synchronous: on disk before the process exits
                        if saves is not None:
                            saves.finish()
                        guard.record_save(_save(engine, root, step + 1, order.state_dict(), train, meta, counters))
                    elif train.save_every and (step + 1) % train.save_every == 0:
                        seconds = _save(engine, root, step + 1, order.state_dict(), train, meta, counters, saves)
                        if saves is None:  # an async save's time is not what a stop save costs
                            guard.record_save(seconds)
                    if reason:
                        message = (f"stopping at step {step + 1} of {steps} ({reason}); "
                                   f"{ckpt_layout.iteration_name(step + 1)} published; rerun to continue")
                        if log_rank:
                            _say(message)
                            mark_requeue(message)
                        raise Requeue(message)
        finally:
            progress.close()
            if sinks is not None:
                sinks.close()
    if saves is not None:
        saves.finish()
    if latest_step(root) != steps:
        _save(engine, root, steps, order.state_dict(), train, meta, counters)
    return last


def _non_finite(engine: Engine, root: Path, step: int, before: dict, train: TrainConfig, meta: dict,
                counters: dict, metrics: dict) -> None:
    """The step made no update (on any rank). skip: log and go on; stop: save the state before this
    step (data cursor included, so a rerun retries the same batch) and raise on every rank."""
    what = (f"step {step + 1}: non-finite loss or gradient norm on at least one rank "
            f"(loss={metrics['loss']}, grad_norm={metrics['grad_norm']}); no update")
    if train.nan_policy != "stop":
        if engine.layout.is_logging_rank:
            _say(f"{what}; skipped (train.nan_policy=skip, {counters['nonfinite_steps']} so far)")
        return
    if latest_step(root) != step:
        saved = dict(counters, nonfinite_steps=counters["nonfinite_steps"] - 1)
        _save(engine, root, step, before, train, meta, saved)
    raise NonFiniteError(f"{what}; stopped (train.nan_policy=stop) with {ckpt_layout.iteration_name(step)} "
                         f"in {root} holding the state before it; rerun with train.nan_policy=skip to step over it")

"""Fault-injection hooks for the reliability tests, switched on by environment variables only.

    STEPWISE_INJECT_NAN="RANK:STEP"   rank RANK multiplies its loss by NaN at optimizer step STEP (1-based)
    STEPWISE_KILL_AT="PHASE:STEP"     SIGKILL this process at a checkpoint PHASE of the save of STEP:
                                      "staged" (shards written, nothing published) or
                                      "renamed" (iteration renamed into place, `latest` not yet updated)

Unset (the normal case) they do nothing. They are read here and nowhere else.
"""
from __future__ import annotations

import os
import signal
from typing import Callable

NAN_ENV = "STEPWISE_INJECT_NAN"
KILL_ENV = "STEPWISE_KILL_AT"


def _pair(name: str) -> tuple[str, int] | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    head, sep, step = value.rpartition(":")
    if not sep or not step.isdigit():
        raise ValueError(f"{name}={value!r}: expected 'X:STEP' with an integer STEP")
    return head, int(step)


def nan_loss(loss_fn: Callable, rank: int, step: int) -> Callable:
    """`loss_fn`, or a version whose loss is NaN when STEPWISE_INJECT_NAN names this rank and step."""
    target = _pair(NAN_ENV)
    if target is None or (int(target[0]), target[1]) != (rank, step):
        return loss_fn

    def poisoned(batch, outputs):
        loss, metrics = loss_fn(batch, outputs)
        return loss * float("nan"), metrics

    return poisoned


def kill_point(phase: str, step: int) -> None:
    """Die at once (no cleanup, like `kill -9`) when STEPWISE_KILL_AT names this phase and step."""
    if _pair(KILL_ENV) == (phase, step):
        os.kill(os.getpid(), signal.SIGKILL)

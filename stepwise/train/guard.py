"""Stopping a run on purpose: preemption signals, the wall-clock deadline, and non-finite steps.

`REQUEUE_EXIT_CODE` is defined here and nowhere else: a training process that saved because it was
asked to stop (SIGUSR1 / SIGTERM, or `train.max_wall_minutes` running out) exits with it, meaning
"nothing is lost; run the same command again to continue". It is 75, `EX_TEMPFAIL` of sysexits.h.

`StopGuard` records signals in a flag (the handler does nothing else) and, once per step, agrees
with every rank (one MAX all-reduce) whether to stop, so all ranks save at the same step.
"""
from __future__ import annotations

import os
import signal
import threading
import time


REQUEUE_EXIT_CODE = 75
REQUEUE_MARKER_ENV = "STEPWISE_REQUEUE_MARKER"  # file the launcher watches: torchrun turns 75 into 1
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
_REASONS = {1: "train.max_wall_minutes is about to run out", 2: "SIGUSR1", 3: "SIGTERM"}


class Requeue(SystemExit):
    """Raised after the stop checkpoint is published; uncaught, the process exits with REQUEUE_EXIT_CODE."""

    def __init__(self, message: str):
        super().__init__(REQUEUE_EXIT_CODE)
        self.message = message

    def __str__(self) -> str:
        return self.message


def mark_requeue(message: str) -> None:
    """Tell the launcher (when it set REQUEUE_MARKER_ENV) that the workers stopped to be requeued."""
    marker = os.environ.get(REQUEUE_MARKER_ENV)
    if marker:
        from stepwise.data.jsonl import atomic_write_text

        atomic_write_text(marker, message + "\n")


class NonFiniteError(RuntimeError):
    """`train.nan_policy=stop` met a non-finite loss or gradient norm (a checkpoint was saved first)."""


def process_start_time() -> float:
    """Wall-clock time (epoch seconds) this process started."""
    import psutil

    return psutil.Process().create_time()


def deadline_near(elapsed_s: float, budget_s: float, step_s: float, save_s: float) -> bool:
    """True when one more step plus a save would not end before the budget."""
    return elapsed_s + step_s + save_s >= budget_s


class StopGuard:
    """Signals and deadline, turned into one decision every rank shares (use as a context manager)."""

    def __init__(self, max_wall_minutes: float | None, started: float | None = None):
        self.budget_s = None if max_wall_minutes is None else 60.0 * max_wall_minutes
        self.started = process_start_time() if started is None else started
        self.signal_code = 0
        self.longest_step_s = 0.0
        self.longest_save_s = 0.0
        self._previous: dict = {}

    def __enter__(self) -> "StopGuard":
        if threading.current_thread() is threading.main_thread():
            for number in STOP_SIGNALS:
                self._previous[number] = signal.signal(number, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def _on_signal(self, number, frame) -> None:
        self.signal_code = max(self.signal_code, 2 if number == signal.SIGUSR1 else 3)

    def record_step(self, seconds: float) -> None:
        self.longest_step_s = max(self.longest_step_s, seconds)

    def record_save(self, seconds: float) -> None:
        self.longest_save_s = max(self.longest_save_s, seconds)

    def _local_code(self) -> int:
        code = self.signal_code
        if self.budget_s is not None:
            # before the first save, reserve another step's time for it
            save_s = self.longest_save_s or self.longest_step_s
            if deadline_near(time.time() - self.started, self.budget_s, self.longest_step_s, save_s):
                code = max(code, 1)
        return code

    def agreed_reason(self) -> str | None:
        """Collective, once per step on every rank: why the run must stop now, or None."""
        from stepwise.parallel.agree import agree_max  # here: the driver imports this module without torch

        code = agree_max(self._local_code())
        return _REASONS.get(code) if code else None

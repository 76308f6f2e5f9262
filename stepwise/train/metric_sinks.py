"""Where a training section's logged metrics go: always `metrics.jsonl` in the checkpoint directory;
TensorBoard event files beside it when `train.tensorboard` is on and `tensorboard` imports; Weights &
Biases when `WANDB_PROJECT` is set and `wandb` imports. Neither optional sink is required: when one
is asked for but missing, one line says so and training goes on with the others.

Only the logging rank writes. The event files live in `CHECKPOINTS/tensorboard/` (one run per section,
so `tensorboard --logdir RUN_DIR` shows every section of a run); a resumed section appends to them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path


def _say(message: str) -> None:
    print(f"[stepwise] {message}", flush=True)


def _tensorboard_writer(directory: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        _say(f"train.tensorboard is on but TensorBoard cannot be imported ({error}); "
             f"pip install tensorboard to get event files; metrics.jsonl is written as always")
        return None
    return SummaryWriter(log_dir=str(directory))


def _wandb_run(name: str, config: dict):
    try:
        import wandb
    except ImportError as error:
        _say(f"WANDB_PROJECT is set but wandb cannot be imported ({error}); pip install wandb to log there")
        return None
    return wandb.init(project=os.environ["WANDB_PROJECT"], name=name, config=config, resume="allow",
                      id=name.replace("/", "-"))


class MetricSinks:
    """`write(metrics)` sends one step's metrics (a dict with "step") to every sink; `close()` at the end."""

    def __init__(self, root: Path, name: str, tensorboard: bool, config: dict | None = None):
        self.jsonl = root / "metrics.jsonl"
        self.tensorboard = _tensorboard_writer(root / "tensorboard") if tensorboard else None
        self.wandb = _wandb_run(name, config or {}) if os.environ.get("WANDB_PROJECT") else None

    def write(self, metrics: dict) -> None:
        with self.jsonl.open("a") as handle:
            handle.write(json.dumps(metrics) + "\n")
        scalars = {key: float(value) for key, value in metrics.items()
                   if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, global_step=metrics["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=metrics["step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()

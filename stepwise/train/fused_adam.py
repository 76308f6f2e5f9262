"""Torch's fused AdamW kernel for the engine's optimizer where its parameters live on the CPU.

megatron-core builds Transformer Engine's or apex's fused Adam when either is installed (GPU clusters);
without them it builds `torch.optim.AdamW` with torch's defaults, which on CPU is the for-loop form:
about ten elementwise passes and their Python per parameter. Torch has a fused CPU kernel for the same
update (`fused=True`, one call over all of an optimizer's tensors). Measured on the 2-core CPU sandbox,
the engine's optimizer step at `benchmarks/train_step.py`'s default shape: 12.3 ms -> 3.6 ms
(`benchmarks/RESULTS.md`). The arithmetic is AdamW's; the fused kernel rounds in a different order
(parameters after 20 steps differ by ~3e-8 relative from the for-loop form's).

`use_fused_cpu_adam` switches each torch Adam/AdamW inside megatron's (chained) optimizer whose
parameters are all floating-point CPU tensors, before its first step (its state then starts as the
fused kernel keeps it; a checkpoint's state loads into either form). GPU parameters keep what megatron
chose.
"""
from __future__ import annotations

import torch


def torch_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside a megatron optimizer (a `ChainedOptimizer` or a single one)."""
    members = getattr(optimizer, "chained_optimizers", [optimizer])
    inner = (getattr(member, "optimizer", None) for member in members)
    return [optimizer for optimizer in inner if isinstance(optimizer, torch.optim.Optimizer)]


def use_fused_cpu_adam(optimizer) -> int:
    """Switch the torch Adam/AdamW optimizers of `optimizer` holding only floating-point CPU parameters
    to torch's fused kernel; returns how many were switched. Call before the first step."""
    switched = 0
    for inner in torch_optimizers(optimizer):
        params = [p for group in inner.param_groups for p in group["params"]]
        if not isinstance(inner, torch.optim.Adam) or not params or inner.state:
            continue
        if any(p.device.type != "cpu" or not torch.is_floating_point(p) for p in params):
            continue
        if any(group.get("differentiable") or group.get("capturable") for group in inner.param_groups):
            continue
        for settings in (inner.defaults, *inner.param_groups):
            settings["fused"], settings["foreach"] = True, False
        switched += 1
    return switched

"""Lets megatron-core 0.16 train on CPU with gloo when CUDA is absent.

megatron-core hard-codes CUDA in a few places (current device, synchronize, the CUDA RNG tracker,
`device="cuda"` in the pipeline schedules and p2p code). `install()` replaces exactly those:
- `torch.cuda.current_device` -> the CPU device, `torch.cuda.synchronize` -> no-op;
- the CUDA RNG state tracker -> one whose `fork()` swaps in CPU generators;
- a TorchFunctionMode that maps `device="cuda"` in factory calls and `Tensor.cuda()` to the CPU (for
  building models, optimizers and checkpoints); inside `step_scope()` (a training or scoring step) it
  is off, since it costs a Python hop on each of the step's ~1,000 torch calls (4 ms of a 740 ms step
  of `benchmarks/train_step.py`), and the megatron modules whose per-step code hard-codes
  `device="cuda"` see a `torch` whose factories map it instead (`TorchWithCpuFactories`);
- the optimizer's gradient clipping, which asserts `torch.cuda.FloatTensor` grads, by the same
  arithmetic on CPU tensors, and the l2 norm's per-tensor Python loop by one foreach call (the
  model-parallel-aware norm is megatron's own, unchanged);
- APEX's `fused_weight_gradient_mlp_cuda` (weight gradients added straight into DDP's `main_grad`,
  megatron's gradient accumulation fusion) by `stepwise.parallel.wgrad.CPU_KERNELS`.
It is a no-op when CUDA is available, and idempotent.
"""
from __future__ import annotations

import contextlib
import importlib
import types

import torch
from torch.overrides import TorchFunctionMode, _get_current_function_mode

from stepwise.parallel import wgrad

_INSTALLED = False


class CPURNGTracker:
    """Drop-in for megatron's CudaRNGStatesTracker, backed by CPU generators."""

    def __init__(self) -> None:
        self.states: dict[str, torch.Generator] = {}

    def add(self, name: str, seed: int) -> None:
        if name in self.states:
            raise RuntimeError(f"RNG state {name} already exists")
        generator = torch.Generator()
        generator.manual_seed(seed)
        self.states[name] = generator

    def is_initialized(self) -> bool:
        return True

    def reset(self) -> None:
        self.states = {}

    def get_states(self) -> dict[str, torch.Tensor]:
        return {name: generator.get_state() for name, generator in self.states.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        for name, state in states.items():
            self.states.setdefault(name, torch.Generator()).set_state(state)

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        generator = self.states[name]
        saved = torch.get_rng_state()
        torch.set_rng_state(generator.get_state())
        try:
            yield
        finally:
            generator.set_state(torch.get_rng_state())
            torch.set_rng_state(saved)


def _cuda_device_to_cpu(kwargs: dict) -> dict:
    """`kwargs` with a `device="cuda..."` replaced by the CPU (a copy; the caller's dict is left alone)."""
    device = kwargs.get("device")
    if device is not None and str(device).startswith("cuda"):
        return {**kwargs, "device": "cpu"}
    return kwargs


class CudaToCpu(TorchFunctionMode):
    """Maps `device="cuda"` in factory calls and `Tensor.cuda()` to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.cuda:
            return args[0]
        return func(*args, **_cuda_device_to_cpu(kwargs or {}))


MODE = CudaToCpu()
TRACKER = CPURNGTracker()

# megatron modules whose per-step code creates tensors with a literal device="cuda": the schedule's
# token count, the gradient norm's buffers and its l2 norm
PER_STEP_CUDA_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.utils",
)
FACTORIES = frozenset({"empty", "zeros", "ones", "full", "tensor", "arange", "empty_like", "zeros_like",
                       "ones_like", "full_like"})


def _factory_on_cpu(factory):
    def on_cpu(*args, **kwargs):
        return factory(*args, **_cuda_device_to_cpu(kwargs))

    return on_cpu


class TorchWithCpuFactories(types.ModuleType):
    """`torch` as a per-step megatron module sees it: the same module, with factories that map
    `device="cuda"` to the CPU."""

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name: str):
        value = getattr(torch, name)
        if name in FACTORIES:
            value = _factory_on_cpu(value)
        setattr(self, name, value)  # later lookups are plain attribute reads
        return value


@contextlib.contextmanager
def step_scope():
    """A training or scoring step: the CudaToCpu mode off while inside (when it is on top of the mode
    stack; nested scopes and other modes are left as they are)."""
    if _get_current_function_mode() is not MODE:
        yield
        return
    MODE.__exit__(None, None, None)
    try:
        yield
    finally:
        MODE.__enter__()


def clip_grad_by_total_norm_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """megatron's `clip_grad_by_total_norm_fp32` for CPU tensors: scale grads by max_norm / norm (one
    foreach call)."""
    attribute = "decoupled_grad" if use_decoupled_grad else "grad"
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff >= 1.0:
        return
    grads = [grad.detach() for grad in (getattr(param, attribute, None) for param in parameters) if grad is not None]
    if grads:
        torch._foreach_mul_(grads, clip_coeff)


def foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """megatron's `local_multi_tensor_l2_norm` (its CPU stand-in for APEX's multi-tensor l2 norm: a
    `torch.norm` per tensor in Python, then the norm of those) in one foreach call: the same per-tensor
    norms and total, as a [1] tensor."""
    norms = torch._foreach_norm(tensor_lists[0])
    return torch.linalg.vector_norm(torch.stack(norms)).reshape(1), None


def install() -> bool:
    """Apply the shim when CUDA is absent; returns True when it is (now) active."""
    global _INSTALLED
    if torch.cuda.is_available():
        return False
    if _INSTALLED:
        return True
    import megatron.core.optimizer.clip_grads as megatron_clip_grads
    import megatron.core.optimizer.optimizer as megatron_optimizer
    import megatron.core.tensor_parallel.layers as megatron_layers
    import megatron.core.tensor_parallel.random as megatron_random

    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *args, **kwargs: None
    megatron_random._CUDA_RNG_STATE_TRACKER = TRACKER
    megatron_random.get_cuda_rng_tracker = lambda *args, **kwargs: TRACKER
    megatron_optimizer.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_cpu
    megatron_clip_grads.l2_norm_impl = foreach_l2_norm
    megatron_layers.fused_weight_gradient_mlp_cuda = wgrad.CPU_KERNELS
    megatron_layers._grad_accum_fusion_available = True
    for name in PER_STEP_CUDA_MODULES:
        importlib.import_module(name).torch = TorchWithCpuFactories()
    MODE.__enter__()
    _INSTALLED = True
    return True


def seed_cpu_tracker(seed: int, tensor_parallel_rank: int) -> None:
    """CPU counterpart of megatron's `model_parallel_cuda_manual_seed`."""
    TRACKER.reset()
    TRACKER.add("model-parallel-rng", seed + 2718 + tensor_parallel_rank)
    TRACKER.add("data-parallel-rng", seed)

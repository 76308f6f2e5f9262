"""One gloo transport device per process, shared by every gloo process group.

torch gives each gloo process group its own transport device, and each device its own event-loop thread
that wakes every 10 ms (gloo's `epoll_wait` timeout) whether or not anything is sent. megatron-core
creates some twenty groups per layout (TP, PP, DP, CP, expert, embedding, ... and gloo copies of
several), all gloo on CPU: measured on the 2-core CPU sandbox, 25 idle groups cost 15 ms of CPU time per
second, 1.5% of a core, taken from the training thread's neighbour and counted in its process time;
with one shared device the same 25 groups cost 1.7 ms per second. gloo runs any number of contexts
(process groups) over one device: each pair is matched by its own sequence number on the device's
listener, so sharing changes no collective.

`share_gloo_device()` makes every gloo process group created afterwards use one device, created on first
use the way torch creates its default device (`GLOO_SOCKET_IFNAME`, `TORCH_GLOO_LAZY_INIT` as usual).
A caller that passes its own options keeps them.
"""
from __future__ import annotations

import torch.distributed.distributed_c10d as c10d

_TorchGloo = c10d.ProcessGroupGloo  # torch's own class, kept before share_gloo_device replaces the name
_DEVICE = None


def shared_device():
    """The process's one gloo device (created on first call)."""
    global _DEVICE
    if _DEVICE is None:
        _DEVICE = _TorchGloo.create_default_device()
    return _DEVICE


class _AnyTorchGloo(type(_TorchGloo)):
    """Metaclass: torch's `isinstance(backend, ProcessGroupGloo)` checks keep holding for every gloo
    backend, those made before `share_gloo_device` and those torch hands back as its own class."""

    def __instancecheck__(cls, instance) -> bool:
        return isinstance(instance, _TorchGloo)


class SharedDeviceGloo(_TorchGloo, metaclass=_AnyTorchGloo):
    """torch's ProcessGroupGloo on the process's shared device (unless given options of its own)."""

    def __init__(self, store, rank, size, options_or_timeout=None, *, timeout=None):
        options = options_or_timeout
        if not isinstance(options, _TorchGloo._Options):  # torch's (store, rank, size[, timeout]) form
            options = _TorchGloo._Options()  # torch's own default timeout unless one is given
            timeout = options_or_timeout if timeout is None else timeout
            if timeout is not None:
                options._timeout = timeout
            options._devices = [shared_device()]
        super().__init__(store, rank, size, options)


def share_gloo_device() -> None:
    """Create every later gloo process group on the shared device (idempotent)."""
    c10d.ProcessGroupGloo = SharedDeviceGloo

"""Rank-symmetric decisions and errors: every rank reaches the same verdict at the same point.

A rank that raises alone while the others enter the next collective hangs the job until the process
group times out. These helpers turn a local flag or a local error into one every rank sees:
`agree_max` / `any_rank` all-reduce a small integer, and `raise_if_any` (or the `rank_symmetric()`
context manager) raises on every rank, with the failing rank's message, before the next collective.
Each is itself a collective: call it at the same point on every rank. Without a process group (one
process) they reduce to the local value.
"""
from __future__ import annotations

import contextlib
import importlib
from typing import Iterator

import torch
import torch.distributed as dist


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _device() -> torch.device:
    if torch.cuda.is_available() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree_max(value: int) -> int:
    """The largest of every rank's `value` (a MAX all-reduce of one integer)."""
    if not _distributed():
        return int(value)
    flag = torch.tensor([int(value)], dtype=torch.int64, device=_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one."""
    return agree_max(1 if flag else 0) > 0


def _class_name(error: BaseException) -> str:
    return f"{type(error).__module__}:{type(error).__qualname__}"


def _rebuild(class_name: str, message: str) -> BaseException:
    """An exception of the failing rank's class (importable ones), else a RuntimeError."""
    module, _, qualname = class_name.partition(":")
    try:
        cls = importlib.import_module(module)
        for part in qualname.split("."):
            cls = getattr(cls, part)
        if isinstance(cls, type) and issubclass(cls, Exception):
            return cls(message)
    except Exception:  # noqa: BLE001 - any failure to rebuild falls back to a plain error
        pass
    return RuntimeError(message)


def raise_if_any(error: BaseException | None) -> None:
    """Collective: if `error` is set on any rank, raise on every rank.

    The failing rank re-raises its own exception (traceback intact); the others raise the same class
    with the message of the lowest failing rank, suffixed with that rank's number.
    """
    if not _distributed():
        if error is not None:
            raise error
        return
    if not any_rank(error is not None):
        return
    payload = (_class_name(error), str(error)) if error is not None else None
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, payload)
    if error is not None:
        raise error
    rank, (class_name, message) = next((r, p) for r, p in enumerate(gathered) if p is not None)
    raise _rebuild(class_name, f"{message} (raised on rank {rank})")


@contextlib.contextmanager
def rank_symmetric() -> Iterator[None]:
    """Run a block whose `Exception`s must reach every rank: all ranks leave it together, or all raise.

        with rank_symmetric():
            records = read_records(path, fields, screen)   # a bad line on one rank fails them all
    """
    try:
        yield
    except Exception as error:  # noqa: BLE001 - re-raised on every rank just below
        raise_if_any(error)
        raise
    raise_if_any(None)

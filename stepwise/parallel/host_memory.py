"""Keeps freed host memory mapped in CPU training processes, as CUDA's caching allocator keeps device memory.

PyTorch's CPU tensors come from glibc's malloc. With its defaults, freeing the activations at the end of a
backward leaves tens of megabytes free at the top of the heap, more than glibc's (adaptive) trim
threshold, so it returns them to the kernel; the next step's activations map them again, and the first
write to each 4 KiB page is a page fault that also zeroes it (tensors over glibc's largest adaptive
mmap threshold, 32 MiB, are mapped and unmapped every time). Measured on the 2-core CPU sandbox
(`benchmarks/RESULTS.md`): 8-25 thousand faults per `benchmarks/train_step.py` engine step, an 8 MiB
elementwise product 5-26 ms on fresh pages against 1.5 ms on mapped ones; with this setting 3 faults
a step and 40% less system time (about 2% of the step's CPU time; user time within noise).

`keep_freed_host_memory()` sets malloc's mmap threshold (tensors up to it come from the heap, not a
fresh mapping each time) and its trim threshold (the heap is not shrunk) once per process, so a step
reuses the pages of the one before. The process then holds its peak heap until it exits, which it
needed anyway. glibc only (other C libraries: nothing is changed); `init_parallel` calls it on CPU,
where there is no caching allocator; CUDA processes are left as they are.
"""
from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 << 30  # a tensor under 1 GiB reuses heap pages
TRIM_THRESHOLD_BYTES = (1 << 31) - 1  # mallopt takes an int: the heap is never trimmed in practice

_SET: bool | None = None


def keep_freed_host_memory() -> bool:
    """Make malloc keep freed memory for reuse (once per process); True where glibc took both settings."""
    global _SET
    if _SET is None:
        _SET = _set_thresholds()
    return _SET


def _set_thresholds() -> bool:
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):  # no C library found, or one without mallopt (not glibc)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mmap threshold first: setting either value turns glibc's adaptive thresholds off, and a trim
    # threshold alone would leave the 128 KiB default mmap threshold, a fresh mapping per tensor
    if not mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES):
        return False
    return bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))

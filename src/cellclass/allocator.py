"""The machine as a process sees it: the CPU cores it may run on (:func:`available_cores`),
and how glibc's ``malloc`` hands memory back to the system, set for what the process does.

glibc serves large allocations with their own ``mmap`` (above a threshold it adjusts as it
goes) and trims the top of its heap when enough is free there, so a training loop that
allocates and frees the same batch-sized buffers every step keeps asking the kernel for
fresh pages, and a small network's step spends a large, varying part of its time in page
faults. Two settings, both through ``mallopt`` (and no-ops where the C library is not glibc):

- :func:`steady_allocator` (training): buffers up to 32 MB come from the heap and freed
  memory stays in the process, so after the first steps a step faults no page in: faster
  steps and a flat peak memory (figures in docs/benchmarks.md).
- :func:`return_large_buffers` (loader worker processes): every allocation above 1 MB gets
  its own ``mmap``, returned when freed, which keeps a worker's footprint flat.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
from collections.abc import Iterator
from typing import Any

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_STEADY_MMAP_BYTES = 32 << 20  # the highest glibc's own adjustment reaches on 64-bit systems
_STEADY_TRIM_BYTES = 1 << 30
_AFTER_TRIM_BYTES = 64 << 20


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the system has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@functools.cache
def _libc() -> Any:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt  # noqa: B018  (glibc has it; musl and macOS do not)
    except (OSError, AttributeError):
        return None
    return libc


def _mallopt(param: int, value: int) -> bool:
    libc = _libc()
    return bool(libc is not None and libc.mallopt(param, value))


@contextlib.contextmanager
def steady_allocator() -> Iterator[bool]:
    """Keep freed memory in the process while the block runs; yields whether it could.

    Afterwards the heap gives back what is free at its top beyond 64 MB, and buffers up to
    32 MB keep coming from the heap (glibc never resumes adjusting a threshold once set,
    and its starting one, 128 kB, would map every batch afresh from then on).
    """
    applied = _mallopt(_M_MMAP_THRESHOLD, _STEADY_MMAP_BYTES) and _mallopt(_M_TRIM_THRESHOLD, _STEADY_TRIM_BYTES)
    try:
        yield applied
    finally:
        if applied:
            _mallopt(_M_TRIM_THRESHOLD, _AFTER_TRIM_BYTES)
            _libc().malloc_trim(_AFTER_TRIM_BYTES)


def return_large_buffers(threshold_bytes: int = 1 << 20) -> bool:
    """Serve every allocation above ``threshold_bytes`` with its own ``mmap``; whether it could.

    glibc raises its mmap threshold after each large ``free``, so batch-sized buffers of
    varying sizes end up on the heap, which fragments and keeps growing over an epoch. A
    fixed threshold keeps a worker's footprint flat.
    """
    return _mallopt(_M_MMAP_THRESHOLD, threshold_bytes)

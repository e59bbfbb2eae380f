"""Process-level runtime tuning for training and evaluation processes."""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


@cache
def tune_allocator(threshold: int = 512 << 20) -> bool:
    """Keep freed tensor memory in the heap instead of returning it to the OS.

    glibc serves large allocations (activations, batches) with fresh mmap pages and unmaps
    them on free, so a training step can pay first-touch page faults for tens of MB each
    time. Raising the mmap and trim thresholds lets the heap reuse that memory. The effect
    measured so far is mixed (BENCHMARKS.md, "Allocator"); ``bench/allocator.py`` measures
    it. Returns False where glibc is not available (the setting is then left alone).
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold))
        ok = bool(libc.mallopt(_M_TRIM_THRESHOLD, threshold)) and ok
    except (OSError, AttributeError):
        return False
    return ok

"""Handing freed heap memory back to the system after the steps that free a lot of it.

Loading a model and compiling a graph free many multi-megabyte temporaries. glibc raises its mmap
threshold (up to 32 MB) each time a mapped block is freed, so later blocks of that size come from the brk
heap, where freed memory stays resident: ~18 MB of SmolLM2's peak RSS. `malloc_trim` returns it. It runs
only after a load and after a graph cache miss, never per token: the decode loop's own allocations (a
logits copy per step) keep reusing the heap, as the raised threshold intends.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Callable


def _trimmer() -> Callable[[], None] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):     # not glibc (musl has no malloc_trim)
        return None
    trim.argtypes = [ctypes.c_size_t]
    return lambda: trim(0)


_TRIM = _trimmer()


def release_free_heap() -> bool:
    """Return the heap's free pages to the system (glibc); False where there is no such call."""
    if _TRIM is None:
        return False
    _TRIM()
    return True

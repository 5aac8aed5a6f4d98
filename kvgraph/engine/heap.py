"""Host heap policy: large buffers always come from their own mappings, so freeing one returns its memory.

glibc raises its mmap threshold (up to 32 MB) each time a mapped block is freed, after which blocks below the
new threshold come from the brk heap, where freed memory stays resident. Loading a model and compiling its
first graphs free many multi-megabyte temporaries, and that raised threshold left ~18 MB of freed memory in
SmolLM2's peak RSS. Fixing the threshold at glibc's default (128 KiB) turns the adjustment off. The hot path
allocates nothing (replayed programs reuse their buffers), so this costs no speed.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3       # mallopt parameter numbers (malloc.h)
MMAP_THRESHOLD = 128 * 1024

_done = False


def return_freed_memory() -> bool:
    """Apply the policy once per process (glibc on Linux; elsewhere nothing to do). True where applied."""
    global _done
    if _done or not sys.platform.startswith("linux"):
        return _done
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _done = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):     # not glibc (musl has no mallopt)
        _done = False
    return _done

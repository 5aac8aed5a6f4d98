"""Host memory: how much a load may still take (`available_bytes`), and handing freed heap memory back to the
system after the steps that free a lot of it.

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
from pathlib import Path
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


def available_bytes(meminfo: str = "/proc/meminfo", cgroup: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes this process can still make resident without swapping or being killed: the kernel's
    MemAvailable (free memory plus what it can reclaim, the page cache among it), capped by what the
    cgroup's memory limit leaves (v2 memory.max - memory.current, v1 limit - usage). None where unknown."""
    try:
        with open(meminfo) as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        try:
            limit = (cgroup / limit_file).read_text().strip()
            if limit != "max" and int(limit) < 1 << 60:
                avail = min(avail, max(0, int(limit) - int((cgroup / usage_file).read_text())))
            break
        except (OSError, ValueError):
            continue
    return avail

"""How many threads the kernels should run: physical cores, never more than the CPUs this process may use.

A thread count above the CPUs the process may run on (its affinity mask, or a container's CPU quota) makes
the kernels' threads wait for each other at every barrier while one of them is not running at all."""
from __future__ import annotations

import math
import os
from pathlib import Path


def physical_cores() -> int:
    """Physical cores of the machine (threads = physical cores is the fast setting for matmul-bound work)."""
    try:
        ids, phys = set(), None
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("physical id"):
                    phys = line.split(":")[1].strip()
                elif line.startswith("core id"):
                    ids.add((phys, line.split(":")[1].strip()))
        if ids:
            return len(ids)
    except OSError:
        pass
    return os.cpu_count() or 1


def _cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """CPUs a cgroup's CPU quota allows (v2 cpu.max, v1 cfs quota / period), rounded up; None without one."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        if quota != "max":
            return max(1, math.ceil(int(quota) / int(period)))
        return None
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return max(1, math.ceil(quota / period)) if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(n, quota) if quota else n)


def kernel_threads(requested: int | None = None) -> int:
    """The kernels' thread count: requested (or the physical cores), at most the usable CPUs."""
    return max(1, min(requested or physical_cores(), usable_cpus()))

"""The kernels' thread count: physical cores by default, never more than the CPUs the process may use (its
affinity mask, a cgroup CPU quota), so no thread waits at every step for a core it cannot have."""
from __future__ import annotations

import os

import pytest

from kvgraph.backends import cpus


def test_cgroup_v2_and_v1_quotas_are_read_and_rounded_up(tmp_path):
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")
    assert cpus._cgroup_quota(v2) == 2
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cpus._cgroup_quota(v2) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpus._cgroup_quota(v1) == 1
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpus._cgroup_quota(v1) is None
    assert cpus._cgroup_quota(tmp_path / "none") is None
    (v2 / "cpu.max").write_text("garbage")
    assert cpus._cgroup_quota(v2) is None


def test_threads_never_exceed_the_cpus_the_process_may_use(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})
    monkeypatch.setattr(cpus, "_cgroup_quota", lambda: None)
    assert cpus.usable_cpus() == 1 and cpus.kernel_threads() == 1 and cpus.kernel_threads(8) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setattr(cpus, "_cgroup_quota", lambda: 3)
    assert cpus.usable_cpus() == 3 and cpus.kernel_threads(8) == 3 and cpus.kernel_threads(2) == 2
    monkeypatch.setattr(cpus, "physical_cores", lambda: 32)
    assert cpus.kernel_threads() == 3


def test_the_native_backend_runs_the_capped_count(monkeypatch):
    from kvgraph.backends import get_backend, native

    if native.library() is None:
        pytest.skip(f"native kernels unavailable: {native.why_not()}")
    before = native.library().kvg_threads()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    backend = get_backend("native", threads=4)
    try:
        assert backend.n_threads == 1 and native.library().kvg_threads() == 1
    finally:
        native.set_threads(before)

"""GraphCache: an LRU of (graph, plan, program, inputs) entries keyed by GraphKey, with statistics.

A hit only writes inputs and runs. A miss builds, plans and compiles, and records why: the key is new,
it was evicted earlier, or caching is disabled. Verify mode rebuilds on every hit and fails loudly if the
fresh graph differs from the cached one.
"""
from __future__ import annotations

import os
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any

from .key import GraphKey

DEFAULT_CAPACITY = 8


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


@dataclass
class CacheEntry:
    key: GraphKey
    graph: Any          # None unless the cache verifies (the graph is rebuilt and compared to it on a hit)
    plan: Any
    program: Any
    inputs: list  # [(GraphInput, owner)]


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    reasons: Counter = field(default_factory=Counter)
    build_s: float = 0.0
    plan_s: float = 0.0
    compile_s: float = 0.0
    set_inputs_s: float = 0.0
    compute_s: float = 0.0
    verified: int = 0
    last_miss: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "hits": self.hits, "misses": self.misses, "rebuild_reasons": dict(self.reasons),
            "build_ms": self.build_s * 1e3, "plan_ms": self.plan_s * 1e3, "compile_ms": self.compile_s * 1e3,
            "set_inputs_ms": self.set_inputs_s * 1e3, "compute_ms": self.compute_s * 1e3,
            "verified": self.verified,
        }

    def summary(self) -> str:
        reasons = ", ".join(f"{r}: {n}" for r, n in self.reasons.most_common()) or "none"
        return (f"graph cache: {self.hits} hits, {self.misses} misses ({reasons}); "
                f"build {self.build_s * 1e3:.1f} ms, plan {self.plan_s * 1e3:.1f} ms, "
                f"compile {self.compile_s * 1e3:.1f} ms, set inputs {self.set_inputs_s * 1e3:.1f} ms, "
                f"compute {self.compute_s * 1e3:.1f} ms")


class GraphCache:
    def __init__(self, capacity: int = DEFAULT_CAPACITY, enabled: bool = True, verify: bool = False):
        if capacity < 1:
            raise ValueError("graph cache capacity must be >= 1")
        self.capacity = capacity
        self.enabled = enabled
        self.verify = verify
        self.entries: OrderedDict[GraphKey, CacheEntry] = OrderedDict()
        self._evicted: set[GraphKey] = set()
        self.stats = CacheStats()

    def lookup(self, key: GraphKey) -> CacheEntry | None:
        """The entry for key (counted as a hit) or None; call `miss` to record why."""
        if not self.enabled:
            return None
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
        return entry

    def record_hit(self) -> None:
        self.stats.hits += 1

    def record_miss(self, key: GraphKey) -> None:
        reason = "disabled" if not self.enabled else ("evicted" if key in self._evicted else "new key")
        self.stats.misses += 1
        self.stats.reasons[reason] += 1
        self.stats.last_miss = f"{reason}: {key.describe()}"

    def insert(self, entry: CacheEntry) -> None:
        if not self.enabled:
            return
        self.entries[entry.key] = entry
        self.entries.move_to_end(entry.key)
        self._evicted.discard(entry.key)
        while len(self.entries) > self.capacity:
            old, _ = self.entries.popitem(last=False)
            self._evicted.add(old)

    def clear(self) -> None:
        self.entries.clear()
        self._evicted.clear()

    def __len__(self) -> int:
        return len(self.entries)

"""Memory planning: execution order, buffer lifetimes and arena offsets.

Every computed (non-view, non-leaf) tensor gets a byte range in one arena. A range is reused as soon as
the last reader of the tensor (or of any view of it) has run, so the arena is far smaller than the sum of
all intermediates. A node's output is allocated before its inputs are released, so an op never writes over
its own sources - except an elementwise op (INPLACE_OPS) whose source of its own shape dies at it: the
output takes that source's range (ggml's in-place reuse; a SwiGLU writes over its gate, a residual add over
its sum). Graph outputs stay alive to the end. The plan is part of a graph-cache entry, so a cache hit does
no planning and no allocation.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

from ..graph.ir import VIEW_OPS, Graph, Tensor

ALIGN = 64
DTYPE_BYTES = {"f32": 4, "i32": 4}   # of what the arena holds (f16 / q8_0: KV cache states only)
# Ops whose every backend kernel reads element i of each source before writing element i of the output (or
# computes into a temporary first), so the output may be the very buffer of a dead source of the same shape.
# tests/test_planner.py runs each backend on in-place and separate buffers and requires identical results.
INPLACE_OPS = frozenset({"add", "mul", "scale", "swiglu", "geglu"})


@dataclass(frozen=True)
class Plan:
    order: tuple[int, ...]             # node ids to execute, in order (leaves and views included)
    offsets: dict[int, int]            # computed node id -> byte offset in the arena
    nbytes: dict[int, int]             # computed node id -> bytes
    lifetimes: dict[int, tuple[int, int]]  # computed node id -> (first step, last step) in `order`
    arena_size: int

    def summary(self) -> str:
        total = sum(self.nbytes.values())
        return f"{len(self.order)} nodes, {len(self.offsets)} buffers, arena {self.arena_size} B (sum {total} B)"


def base_of(t: Tensor) -> Tensor:
    """The tensor that owns the memory t lives in (views resolve to their source)."""
    while t.op in VIEW_OPS:
        t = t.srcs[0]
    return t


def live_nodes(graph: Graph) -> list[Tensor]:
    """Nodes that contribute to an output or write a state, in topological (creation) order."""
    roots = list(graph.outputs.values()) + [t for t in graph.nodes if t.op == "set_rows"]
    seen: set[int] = set()
    stack = list(roots)
    while stack:
        t = stack.pop()
        if t.id in seen:
            continue
        seen.add(t.id)
        stack.extend(t.srcs)
    return [t for t in graph.nodes if t.id in seen]


class _FreeList:
    """Best-fit allocator over [0, end) with coalescing of freed ranges."""

    def __init__(self) -> None:
        self.free: list[tuple[int, int]] = []  # sorted (offset, size)
        self.end = 0

    def alloc(self, size: int) -> int:
        size = (size + ALIGN - 1) // ALIGN * ALIGN
        best = None
        for i, (off, sz) in enumerate(self.free):
            if sz >= size and (best is None or sz < self.free[best][1]):
                best = i
        if best is not None:
            off, sz = self.free.pop(best)
            if sz > size:
                bisect.insort(self.free, (off + size, sz - size))
            return off
        # Grow: reuse a free block that touches the end of the arena.
        if self.free and self.free[-1][0] + self.free[-1][1] == self.end:
            off, _ = self.free.pop()
        else:
            off = self.end
        self.end = off + size
        return off

    def release(self, off: int, size: int) -> None:
        size = (size + ALIGN - 1) // ALIGN * ALIGN
        bisect.insort(self.free, (off, size))
        merged: list[tuple[int, int]] = []
        for o, s in self.free:
            if merged and merged[-1][0] + merged[-1][1] == o:
                merged[-1] = (merged[-1][0], merged[-1][1] + s)
            else:
                merged.append((o, s))
        self.free = merged


def _weight_matmul_input(t: Tensor) -> int | None:
    """The input's id when t is a matmul of an activation by a weight matrix (the compilers' fusion case)."""
    if t.op == "matmul" and t.srcs[1].op == "weight" and t.p.get("transpose_b"):
        return t.srcs[0].id
    return None


def group_sibling_matmuls(nodes: list[Tensor]) -> list[Tensor]:
    """nodes (topologically ordered) with every weight matmul of one input moved up to the first of them,
    each with its weight leaf: the compilers stack such matmuls into one, and whether they can must not
    depend on the order in which a model file happened to write its statements (q = ...; norm(q); k = ...).
    Still a topological order: a sibling needs only the shared input, ready at the first one's step."""
    siblings: dict[int, list[Tensor]] = {}
    for t in nodes:
        x = _weight_matmul_input(t)
        if x is not None:
            siblings.setdefault(x, []).append(t)
    out: list[Tensor] = []
    placed: set[int] = set()
    for t in nodes:
        if t.id in placed:
            continue
        x = _weight_matmul_input(t)
        for s in siblings[x] if x is not None else (t,):
            for leaf in ((s.srcs[1],) if x is not None else ()):
                if leaf.id not in placed:
                    out.append(leaf)
                    placed.add(leaf.id)
            out.append(s)
            placed.add(s.id)
    return out


def _donor(t: Tensor, step: int, last_use: dict[int, int], offsets: dict[int, int]) -> Tensor | None:
    """The source whose range elementwise op t may write over at `step`: read directly (no view), of t's
    shape and dtype, last read here, and the only source living in that range."""
    if t.op not in INPLACE_OPS:
        return None
    bases = [base_of(s).id for s in t.srcs]
    for s in t.srcs:
        if (s.op not in VIEW_OPS and s.id in offsets and last_use.get(s.id) == step and s.shape == t.shape
                and s.dtype == t.dtype and bases.count(s.id) == 1):
            return s
    return None


def plan_graph(graph: Graph, inplace: bool = True) -> Plan:
    """The plan of graph; inplace=False gives every computed tensor its own range (tests compare both)."""
    nodes = group_sibling_matmuls(live_nodes(graph))
    step = {t.id: i for i, t in enumerate(nodes)}
    owners = [t for t in nodes if not t.is_leaf and t.op not in VIEW_OPS]
    last_use = {t.id: step[t.id] for t in owners}
    for t in nodes:
        for s in t.srcs:
            b = base_of(s)
            if b.id in last_use:
                last_use[b.id] = max(last_use[b.id], step[t.id])
    end = len(nodes)
    for out in graph.outputs.values():
        b = base_of(out)
        if b.id in last_use:
            last_use[b.id] = end

    releases: dict[int, list[Tensor]] = {}
    for t in owners:
        releases.setdefault(last_use[t.id], []).append(t)

    alloc = _FreeList()
    offsets: dict[int, int] = {}
    nbytes: dict[int, int] = {}
    handed_on: set[int] = set()        # tensors whose range a later in-place op took over (it frees it)
    for i, t in enumerate(nodes):
        if t.id in last_use:
            nbytes[t.id] = t.n_elements * DTYPE_BYTES[t.dtype]
            donor = _donor(t, i, last_use, offsets) if inplace else None
            if donor is not None:
                offsets[t.id] = offsets[donor.id]
                handed_on.add(donor.id)
            else:
                offsets[t.id] = alloc.alloc(nbytes[t.id])
        for dead in releases.get(i, ()):
            if dead.id not in handed_on:
                alloc.release(offsets[dead.id], nbytes[dead.id])
    lifetimes = {tid: (step[tid], last_use[tid]) for tid in offsets}
    return Plan(tuple(t.id for t in nodes), offsets, nbytes, lifetimes, alloc.end)

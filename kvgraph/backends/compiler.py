"""The one compile loop of every backend (`Compiler`), and what the quantized backends add to it
(`FusingCompiler`, torch and native): staging, and two compile-time fusions, each applied only where the
plan makes it safe:

* rms_norm -> mul(weight): one kernel, when nothing runs in between and the multiply's buffer either is
  the norm's input buffer exactly (the plan reuses it once the norm is its last reader; the fused kernels
  read a whole row before writing it) or does not overlap it at all;
* matmuls of one input against several weights of one format (q/k/v): one matmul against the weights
  stacked along N, run at the last member's step when no member's result is read before it;
* get_rows(state columns, slots) -> ssm_scan / ssm_scan2 -> set_rows(same columns, same slots) of the new
  state: the C scan reads and writes the state in place by slot (no gathered copy, no write-back), when
  nothing else touches those columns in between; likewise a conv window: get_rows(window columns) ->
  concat_rows with the new inputs -> ssm_conv, the last inputs set_rows'd back: the C convolution reads the
  window by slot and writes the next one.

A gated FFN's `matmul_glu` runs as one C kernel over the stacked gate/up tiles when both weights have one
format (the products stay in registers); otherwise (`glu_products`) as two matmuls into scratch buffers that
the program's matmul_glu nodes share, then the activation.

Matmul inputs a kernel reads in another form (int8 blocks, bfloat16) are staged once per source in a
StagingPool. A backend's compiler lists its kernel choosers in order (`choosers`: kvgraph's C kernels, then
torch, then the numpy reference); each node gets the first kernel offered. Plain numpy, no torch.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ..graph.ir import VIEW_OPS, Graph, Tensor
from ..plan.planner import Plan, base_of
from . import native, reference
from .native import ops as native_ops
from .native.mats import Q8Act, as_rows

Kernel = Callable[[], None]


def gated_kind(t: Tensor) -> str:
    """The activation of a gated node, "swiglu" or "geglu" (a swiglu / geglu op, or a matmul_glu's kind)."""
    return t.p["kind"] if t.op == "matmul_glu" else t.op


class StagingPool:
    """Copies of a Program's matmul inputs in the form their kernels read: one per (source tensor, format),
    made before the first matmul that reads it and shared by the rest; a buffer is reused once the last
    reader of what it holds has run (`last_use`: key -> step of that reader)."""

    def __init__(self, last_use: dict[tuple[int, Any], int]) -> None:
        self.last_use = last_use
        self.live: dict[tuple[int, Any], Any] = {}
        self.free: list[Any] = []
        self.nbytes = 0

    def get(self, key: tuple[int, Any], step: int, fits: Callable[[Any], bool], make: Callable[[], Any]):
        """(the buffer for key, True when it was just given to key: the caller adds the kernel filling it)."""
        for k in [k for k in self.live if self.last_use[k] < step]:
            self.free.append(self.live.pop(k))
        if key in self.live:
            return self.live[key], False
        for i, buf in enumerate(self.free):
            if fits(buf):
                del self.free[i]
                break
        else:
            buf = make()
            self.nbytes += buf.nbytes
        self.live[key] = buf
        return buf, True


class PackedWeightsBackend:
    """What the backends holding PackedWeights share: the tied output's matmul form, weight bytes, and the
    stacked matrix of several matrices that read one input, built once and shared by every Program that
    fuses the same group (the members keep views of its rows)."""

    def start_load(self, gguf_file) -> None:
        """A model file's weights are about to be loaded (a backend that keeps them between runs looks here)."""

    def weight_bytes(self, gguf_file, names) -> int:
        """About what the named tensors will take resident: the file's bytes (tiles are within 3% of them),
        8.5 bits per weight for the types re-quantized to Q8."""
        from .native.mats import REQUANTIZED, runs_as

        total = 0
        for name in names:
            info = gguf_file.tensor(name)
            if info is not None:
                requant = len(info.shape) == 2 and runs_as(info.type_name) == REQUANTIZED
                total += info.n_elements * 17 // 16 if requant else info.n_bytes
        return total

    def finish_load(self) -> None:
        """Every weight is in: the tile arena's unused space goes back to the system."""
        if getattr(self, "arena", None) is not None:
            self.arena.release_unused()

    def tie_output(self, embedding):
        embedding.matrix()        # the output matmul's repacked form, built once here
        return embedding

    def weights_nbytes(self, weights) -> int:
        return sum(w.nbytes for w in {id(w): w for w in weights.values()}.values())

    def fused(self, mats: list):
        cache = self.__dict__.setdefault("_fused", {})
        key = tuple(id(m) for m in mats)
        if key not in cache:
            cache[key] = (mats, type(mats[0]).fuse(mats))   # keeps the members alive: ids stay valid
        return cache[key][1]


class Compiler:
    """Compile (graph, plan) into a Program: walk the plan in order, bind weights, states and inputs, resolve
    views, carve every other node's buffer out of one arena, and for each computing node append the first
    kernel the choosers offer. The numpy backend uses it as it is (only the reference chooser)."""

    program_class = reference.Program

    def __init__(self, backend, graph: Graph, plan: Plan, weights, states):
        self.backend, self.graph, self.plan, self.weights, self.states = backend, graph, plan, weights, states
        self.nodes = graph.nodes
        self.kernels: list[Kernel] = []
        self.bufs: dict[int, Any] = {}
        self.inputs: dict[str, np.ndarray] = {}
        self.skip: set[int] = set()                   # nodes a fused kernel computes
        self.emitted_at: dict[int, int] = {}          # node id -> index of its kernel in self.kernels
        self.rope = reference.RopeTables()

    def choosers(self) -> list[Callable[[Tensor, int, Any, list], Kernel | None]]:
        """Kernel choosers, (node, step, out, srcs) -> kernel or None, in the order they are asked."""
        return [self.reference_kernel]

    def staged_bytes(self) -> int:
        return 0

    def compile(self, arena: np.ndarray | None = None):
        """The Program. arena: the uint8 buffer the computed nodes live in (a context's programs share one,
        as they run one at a time); a new one of the plan's size when None."""
        plan, nodes, bufs = self.plan, self.nodes, self.bufs
        if arena is None:
            arena = np.empty(plan.arena_size, np.uint8)
        elif arena.dtype != np.uint8 or arena.size < plan.arena_size:
            raise ValueError(f"compute arena of {arena.size} bytes for a plan of {plan.arena_size}")
        for step, tid in enumerate(plan.order):
            t = nodes[tid]
            if t.op in ("weight", "state"):
                buf = bufs[tid] = (self.weights if t.op == "weight" else self.states)[t.name]
                if reference.element_shape(buf) != t.shape:
                    raise ValueError(f"{t.op} {t.name!r}: bound array has shape {buf.shape}, graph expects {t.shape}")
            elif t.op == "input":
                bufs[tid] = self.inputs[t.name] = np.zeros(t.shape, reference.NP_DTYPES[t.dtype])
            elif tid not in plan.offsets:              # a view (or set_rows) of its first source
                buf = bufs[tid] = reference.view(t, self.arr(bufs[t.srcs[0].id]))
                if t.op == "set_rows" and tid not in self.skip:
                    self.emitted_at[tid] = len(self.kernels)
                    self.kernels.append(self.set_rows_kernel(t, buf, [self.arr(bufs[s.id]) for s in t.srcs]))
            else:
                off = plan.offsets[tid]
                bufs[tid] = arena[off: off + plan.nbytes[tid]].view(reference.NP_DTYPES[t.dtype]).reshape(t.shape)
                if tid not in self.skip:
                    self.emit(t, step)
        outputs = {name: bufs[o.id] for name, o in self.graph.outputs.items()}
        kernels = [k for k in self.kernels if k is not None]     # None: a kernel a later fusion took over
        return self.program_class(native.batch(kernels), self.inputs, outputs,
                                  plan.arena_size + self.staged_bytes())

    def emit(self, t: Tensor, step: int) -> None:
        out, srcs = self.bufs[t.id], [self.bufs[s.id] for s in t.srcs]
        for choose in self.choosers():
            k = choose(t, step, out, srcs)
            if k is not None:
                self.emitted_at[t.id] = len(self.kernels)
                self.kernels.append(k)
                return
        raise AssertionError(f"no kernel chooser took {t.op}")

    def reference_kernel(self, t: Tensor, step: int, out: np.ndarray, srcs: list) -> Kernel:
        """The numpy reference kernel (rope with cos / sin tables shared by the run's rope ops)."""
        arrays = [self.arr(s) for s in srcs]
        if t.op == "rope":
            cos, sin, table_kernel = self.rope.get(t, arrays[1])
            if table_kernel is not None:
                self.kernels.append(table_kernel)
            return reference.rope_kernel(t, out, arrays[0], cos, sin)
        return reference.KERNELS[t.op](t, out, *arrays)

    @staticmethod
    def arr(x) -> np.ndarray:
        """A bound buffer as a numpy array (a weight's float32 values for a non-matmul use)."""
        return x.array() if hasattr(x, "array") else x

    def set_rows_kernel(self, t: Tensor, buf: np.ndarray, args: list[np.ndarray]) -> Kernel:
        k = native_ops.set_rows(*args, t.p["transposed"], t.p["col"]) if self.backend.native else None
        return k or reference.KERNELS["set_rows"](t, buf, *args)


class FusingCompiler(Compiler):
    """The quantized backends' compiler: matmul inputs staged once per source, rms_norm x weight and matmul
    groups fused (see the module docstring), kvgraph's C kernels offered first."""

    def __init__(self, backend, graph: Graph, plan: Plan, weights, states):
        super().__init__(backend, graph, plan, weights, states)
        self.step_of = {tid: i for i, tid in enumerate(plan.order)}
        self.readers: dict[int, list[Tensor]] = {}
        for tid in plan.order:
            for src in self.nodes[tid].srcs:
                self.readers.setdefault(base_of(src).id, []).append(self.nodes[tid])
        self.outputs_base = {base_of(o).id for o in graph.outputs.values()}
        self.fused_norm: dict[int, Tensor] = {}       # mul node id -> the rms_norm it absorbs
        self.groups: dict[int, list[Tensor]] = {}     # last member id -> members (in order)
        self.last_use: dict[tuple[int, str], int] = {}  # (matmul input id, input form) -> last step
        self.staging = StagingPool(self.last_use)
        # scan / conv node id -> (its state gather, the state write-back, state leaf, first column[, concat])
        self.state_scans: dict[int, tuple[Tensor, Tensor, Tensor, int]] = {}
        self.state_convs: dict[int, tuple[Tensor, Tensor, Tensor, int, Tensor]] = {}
        self._plan_norm_fusion()
        self._plan_matmul_groups()
        self._plan_state_scans()
        self._plan_state_convs()

    # ---- pre-passes -------------------------------------------------------------------------------------
    @staticmethod
    def weight_matmul(t: Tensor) -> bool:
        return t.op == "matmul" and t.srcs[1].op == "weight" and t.p["transpose_b"]

    def _partly_overlaps(self, tid: int, other: Tensor) -> bool:
        """tid's buffer shares some bytes with other's without being exactly the same buffer."""
        other = base_of(other)
        off, nb = self.plan.offsets, self.plan.nbytes
        if other.id not in off or (off[tid], nb[tid]) == (off[other.id], nb[other.id]):
            return False
        return off[tid] < off[other.id] + nb[other.id] and off[other.id] < off[tid] + nb[tid]

    def _plan_norm_fusion(self) -> None:
        for tid in self.plan.order:
            t = self.nodes[tid]
            if not (t.op == "mul" and t.srcs[0].op == "rms_norm" and t.srcs[1].op == "weight"):
                continue
            r, w = t.srcs[0], self.weights[t.srcs[1].name]
            between = self.plan.order[self.step_of[r.id] + 1: self.step_of[tid]]
            if (len(self.readers.get(r.id, ())) == 1 and r.id not in self.outputs_base and w.dense is not None
                    and w.dense.shape[-1:] == r.shape[-1:] and w.dense.size == r.shape[-1] and t.shape == r.shape
                    and all(self.nodes[b].is_leaf or self.nodes[b].op in VIEW_OPS for b in between)
                    and r.srcs[0].shape == r.shape and not self._partly_overlaps(tid, r.srcs[0])):
                self.fused_norm[tid] = r
                self.skip.add(r.id)

    def _plan_matmul_groups(self) -> None:
        by_input: dict[int, list[Tensor]] = {}
        for tid in self.plan.order:
            t = self.nodes[tid]
            if self.weight_matmul(t):
                by_input.setdefault(t.srcs[0].id, []).append(t)
            if self.weight_matmul(t) or t.op == "matmul_glu":
                for w in t.srcs[1:]:
                    mat = self.weights[w.name].matrix()
                    self.last_use[(t.srcs[0].id, mat.input_form)] = self.step_of[tid]
        for members in by_input.values():
            mats = [self.weights[m.srcs[1].name].matrix() for m in members]
            if len(members) < 2 or not hasattr(mats[0], "can_fuse") or not mats[0].can_fuse(mats):
                continue
            last = self.step_of[members[-1].id]
            if any(self.step_of[r.id] < last for m in members for r in self.readers.get(m.id, ())
                   if r.op not in VIEW_OPS or r.op == "set_rows"):
                continue
            self.groups[members[-1].id] = members
            self.skip.update(m.id for m in members[:-1])

    def _plan_state_scans(self) -> None:
        """Scans (Mamba's, and Qwen3-Next's gated delta rule) whose old state is a get_rows of a state's
        columns by slot, read by the scan alone, and whose new state rows go only to a set_rows of those same
        columns at the same slots, with no other read or write of those columns in between: candidates to
        run in place (see state_scan)."""
        for tid in self.plan.order:
            t = self.nodes[tid]
            if t.op not in ("ssm_scan", "ssm_scan2", "gated_delta_net") or t.ndim != 3:
                continue
            gather = self._state_gather(t.srcs[0], t)
            if gather is None:
                continue
            g, table, col = gather
            n_new, width = t.shape[1] - t.srcs[0].shape[1], g.shape[1]
            w = self._write_back(t, g, table, col, n_new)
            if w is None:
                continue
            # every other reader of the scan reads its y rows only (the state rows will not be written)
            if any(self._first_view(src, t) != ("slice_rows", 1, 0) for r in self._computing_readers(t)
                   if r is not w for src in r.srcs if base_of(src) is t):
                continue
            if self._columns_touched(table, (col, col + width), self.step_of[g.id], self.step_of[w.id], {g.id, w.id}):
                continue
            self.state_scans[tid] = (g, w, table, col)

    def _plan_state_convs(self) -> None:
        """Convolutions of concat_rows(window gathered from a state's columns by slot, new inputs) whose
        window is read by the concatenation alone, and the concatenation by the convolution and by one
        set_rows of its last k - 1 rows into the same columns at the same slots (the next window), nothing
        else touching those columns in between: candidates to run in place (see state_conv). The new
        inputs' buffer must outlive the concatenation (its last reader in the plan) up to the convolution."""
        for tid in self.plan.order:
            t = self.nodes[tid]
            if t.op != "ssm_conv" or t.ndim != 3 or t.srcs[0].op != "concat_rows" or t.srcs[0].p["axis"] != 1:
                continue
            cat = t.srcs[0]
            win, new = cat.srcs
            k = t.srcs[1].shape[1]
            gather = self._state_gather(win, cat)
            if gather is None or win.shape[1] != k - 1 or k > native_ops.MAX_TAPS:
                continue
            g, table, col = gather
            w = self._write_back(cat, g, table, col, cat.shape[1] - (k - 1))
            if w is None or {r.id for r in self._computing_readers(cat)} != {t.id, w.id}:
                continue
            last = max(self.step_of[w.id], self.step_of[tid])
            if (self._columns_touched(table, (col, col + g.shape[1]), self.step_of[g.id], last, {g.id, w.id})
                    or not self._kept(new, self.step_of[cat.id], self.step_of[tid], t)):
                continue
            self.state_convs[tid] = (g, w, table, col, cat)

    def _state_gather(self, src: Tensor, reader: Tensor) -> tuple[Tensor, Tensor, int] | None:
        """(the get_rows, the state, first column) when src is (a reshape of) a get_rows of a 2-D state's
        columns by slot, read by `reader` alone and by no graph output."""
        g = src
        while g.op == "reshape":
            g = g.srcs[0]
        if g.op != "get_rows" or g.id in self.outputs_base or g.ndim != 2 or g.n_elements != src.n_elements:
            return None
        table, col = g.srcs[0], 0
        if table.op == "slice_rows" and table.p["axis"] == 1:
            col, table = table.p["start"], table.srcs[0]
        if table.op != "state" or table.ndim != 2 or [r.id for r in self._computing_readers(g)] != [reader.id]:
            return None
        return g, table, col

    def _write_back(self, t: Tensor, g: Tensor, table: Tensor, col: int, start: int) -> Tensor | None:
        """The one set_rows among t's readers, when it writes rows [start, ...) of t (axis 1) into the columns
        g gathered, at g's slots; else None."""
        writes = [r for r in self._computing_readers(t) if r.op == "set_rows"]
        if len(writes) != 1:
            return None
        w = writes[0]
        if not (w.srcs[2] is g.srcs[1] and base_of(w.srcs[0]) is table and not w.p["transposed"]
                and w.p["col"] == col and w.srcs[1].ndim == 2 and w.srcs[1].shape[1] == g.shape[1]
                and self._first_view(w.srcs[1], t) == ("slice_rows", 1, start)):
            return None
        return w

    def _kept(self, src: Tensor, first: int, last: int, reader: Tensor) -> bool:
        """Whether src's buffer is not handed to another node at a step in (first, last], except to reader
        (the in-place convolution) as exactly its own layout: src a reshape of its whole buffer, reader's
        output of its shape in the same bytes (the kernel writes each row after its last read)."""
        b = base_of(src)
        if b.id not in self.plan.offsets:
            return True
        off, nb = self.plan.offsets[b.id], self.plan.nbytes[b.id]
        for m in self.plan.offsets:
            if (m == b.id or not first < self.plan.lifetimes[m][0] <= last
                    or not (self.plan.offsets[m] < off + nb and off < self.plan.offsets[m] + self.plan.nbytes[m])):
                continue
            same = (m == reader.id and (self.plan.offsets[m], self.plan.nbytes[m]) == (off, nb)
                    and reader.shape == src.shape and src.n_elements == b.n_elements
                    and all(v.op == "reshape" for v in self._view_chain(src, b)))
            if not same:
                return False
        return True

    @staticmethod
    def _view_chain(src: Tensor, base: Tensor) -> list[Tensor]:
        """The views from src down to base (src itself first)."""
        chain = []
        while src is not base:
            chain.append(src)
            src = src.srcs[0]
        return chain

    def _computing_readers(self, t: Tensor) -> list[Tensor]:
        """The nodes that read t or a view of it and are not views themselves (a set_rows is: it writes)."""
        return [r for r in self.readers.get(t.id, ()) if r.op not in VIEW_OPS or r.op == "set_rows"]

    @staticmethod
    def _first_view(src: Tensor, base: Tensor) -> tuple | None:
        """(op, axis, start) of the view of base that src is built on, when it is a slice_rows; else None."""
        while src.op in VIEW_OPS and src.srcs[0] is not base:
            src = src.srcs[0]
        return (src.op, src.p["axis"], src.p["start"]) if src.op == "slice_rows" else None

    def _columns_touched(self, state: Tensor, cols: tuple[int, int], first: int, last: int, own: set[int]) -> bool:
        """Whether a node at a step in [first, last] other than `own` may read or write columns [cols) of
        state: a read through a column slice of the state, or a partial set_rows, elsewhere in the rows
        does not; anything else is taken to touch every column."""
        for r in self.readers.get(state.id, ()):
            if r.id in own or (r.op in VIEW_OPS and r.op != "set_rows") or not first <= self.step_of[r.id] <= last:
                continue
            for i, src in enumerate(r.srcs):
                if base_of(src) is not state:
                    continue
                span = (0, state.shape[-1])
                if r.op == "set_rows" and i == 0:        # the state it writes into: the columns it writes
                    if not r.p["transposed"] and r.srcs[1].ndim == 2:
                        span = (r.p["col"], r.p["col"] + r.srcs[1].shape[1])
                else:
                    v = src
                    while v.op in VIEW_OPS and not (v.op == "slice_rows" and v.srcs[0] is state):
                        v = v.srcs[0]
                    if v.op == "slice_rows" and v.p["axis"] == 1:
                        span = (v.p["start"], v.p["start"] + v.p["n"])
                if span[0] < cols[1] and cols[0] < span[1]:
                    return True
        return False

    def state_scan(self, t: Tensor, out: np.ndarray, srcs: list) -> Kernel | None:
        """Scan t in place in its state (planned by _plan_state_scans): the C scan reads each sequence's old
        state from the table by slot and writes the new one back there; the gather's kernel, emitted
        before, is dropped and the write-back skipped. None (the scan as it is) where the buffers do not
        suit the C kernel."""
        g, w, table, col = self.state_scans[t.id]
        tab, ids = self.arr(self.bufs[table.id]), self.bufs[g.srcs[1].id]
        if g.id not in self.emitted_at or not isinstance(tab, np.ndarray) or tab.dtype != np.float32:
            return None
        h0 = tab[:, col: col + g.shape[1]].view()
        h0.shape = (tab.shape[0],) + t.srcs[0].shape[1:]
        rest = [self.arr(s) for s in srcs[1:]]
        kernel = (native_ops.gated_delta_net(h0, *rest, out, ids=ids) if t.op == "gated_delta_net" else
                  native_ops.ssm_scan(t.op, h0, *rest, out, ids=ids, a_const=t.srcs[3].op == "weight"))
        if kernel is not None:
            self.kernels[self.emitted_at[g.id]] = None
            self.skip.add(w.id)
        return kernel

    def state_conv(self, t: Tensor, out: np.ndarray, srcs: list) -> Kernel | None:
        """Convolve t in place in its state (planned by _plan_state_convs): the C convolution reads each
        sequence's window from the table by slot and the new inputs where they are, and writes the next
        window back; the gather, concatenation and write-back kernels, emitted before, are dropped. None
        (the convolution as it is) where the buffers do not suit the C kernel."""
        g, w, table, col, cat = self.state_convs[t.id]
        tab, ids = self.arr(self.bufs[table.id]), self.bufs[g.srcs[1].id]
        if (not all(n.id in self.emitted_at for n in (g, w, cat)) or not isinstance(tab, np.ndarray)
                or tab.dtype != np.float32):
            return None
        kernel = native_ops.ssm_conv(self.arr(self.bufs[cat.srcs[1].id]), self.arr(srcs[1]), out,
                                     window=tab[:, col: col + g.shape[1]], ids=ids)
        if kernel is not None:
            for n in (g, w, cat):
                self.kernels[self.emitted_at[n.id]] = None
        return kernel

    # ---- emission ---------------------------------------------------------------------------------------
    def staged_bytes(self) -> int:
        return self.staging.nbytes

    def q8_input(self, src: Tensor, step: int) -> Q8Act:
        """Matmul input src quantized for the native kernels (the quantize kernel is added once per source)."""
        x = as_rows(self.bufs[src.id])
        act, new = self.staging.get((src.id, "q8"), step, lambda b: isinstance(b, Q8Act) and (b.m, b.k) == x.shape,
                                    lambda: Q8Act(*x.shape))
        if new:
            self.kernels.append(act.quantize_kernel(x))
        return act

    def weight_product(self, src: Tensor, mat, out: np.ndarray, step: int) -> Kernel:
        """The kernel of src @ mat^T into out [M, N] (each backend's matmul binding)."""
        raise NotImplementedError

    def gated(self, t: Tensor, step: int, gate: np.ndarray, up: np.ndarray, out: np.ndarray) -> Kernel:
        """act(gate) * up into out, act that of t (swiglu / geglu, or a matmul_glu's kind): the C kernel, else
        numpy's."""
        kind = gated_kind(t)
        k = native_ops.gated(kind, gate, up, out) if self.backend.native else None
        return k or reference.KERNELS[kind](t, out, gate, up)

    def glu_fused(self, t: Tensor, step: int, out: np.ndarray, srcs: list) -> Kernel | None:
        """matmul_glu as one C kernel over gate and up stacked, where both are tiles of one format."""
        mats = [srcs[1].matrix(), srcs[2].matrix()]
        if not (hasattr(mats[0], "glu_kernel") and mats[0].can_fuse(mats)):
            return None
        return self.backend.fused(mats).glu_kernel(self.q8_input(t.srcs[0], step), out.reshape(-1, mats[0].n),
                                                   t.p["kind"])

    def glu_products(self, t: Tensor, step: int, out: np.ndarray, srcs: list) -> Kernel:
        """matmul_glu as two matmuls into scratch buffers (shared by the program's matmul_glu nodes: each
        is dead once its node has run), then the activation."""
        shape = (out.size // out.shape[-1], out.shape[-1])
        prods = []
        for part, w in (("gate", srcs[1]), ("up", srcs[2])):
            key = (t.id, part)
            self.last_use[key] = step
            buf, _ = self.staging.get(key, step, lambda b: isinstance(b, np.ndarray) and b.shape == shape,
                                      lambda: np.empty(shape, np.float32))
            self.kernels.append(self.weight_product(t.srcs[0], w.matrix(), buf, step))
            prods.append(buf)
        return self.gated(t, step, prods[0], prods[1], out.reshape(shape))

    def weight_rows(self, t: Tensor, step: int, out: np.ndarray, srcs: list) -> Kernel | None:
        """A row lookup in a weight (the embedding) that the C kernel does not take: the weight's own row
        reader (gguf's dequantize of just those rows)."""
        if t.op == "get_rows" and t.srcs[0].op == "weight":
            return srcs[0].rows().kernel(srcs[1], out)
        return None

    def c_kernel(self, t: Tensor, step: int, out: np.ndarray, srcs: list) -> Kernel | None:
        """kvgraph's C kernel for node t (the fused norm x weight, the embedding lookup, or an op of
        native_ops.for_node) when the backend uses them and there is one for its buffers, else None."""
        if not self.backend.native:
            return None
        if t.id in self.fused_norm:
            r = self.fused_norm[t.id]
            return native_ops.rms_norm(self.bufs[r.srcs[0].id], srcs[1].dense.reshape(-1), r.p["eps"], out)
        if t.op == "get_rows" and t.srcs[0].op == "weight":
            # out of the tiles where the weight has them (a tied embedding: its file pages stay untouched)
            from_tiles = getattr(srcs[0].mat, "rows_kernel", None)
            kernel = from_tiles(srcs[1], out) if from_tiles else None
            return kernel or native_ops.embedding_rows(srcs[0].rows(), srcs[1], out)
        if t.op == "get_rows":
            return native_ops.get_rows(self.arr(srcs[0]), srcs[1], out)
        if t.id in self.state_scans or t.id in self.state_convs:
            kernel = self.state_scan(t, out, srcs) if t.id in self.state_scans else self.state_conv(t, out, srcs)
            if kernel is not None:
                return kernel
        if t.op == "matmul_glu":
            return self.glu_fused(t, step, out, srcs)
        if t.op in native_ops.OPS:
            return native_ops.for_node(t, out, [self.arr(s) for s in srcs])
        return None

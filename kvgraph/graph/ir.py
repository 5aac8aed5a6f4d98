"""The graph IR: tensor nodes and a ggml-like builder.

Shapes are in numpy order (the last axis is contiguous). Leaves are weights (constant, bound by name at
compile time), states (persistent KV / recurrent buffers, bound by name) or inputs (written before every
run). Everything a model computes is a node; the builder records nodes in creation order, which is already
a topological order.

View ops (reshape, permute, view_rows, view_cols, split_heads...) never compute: a backend resolves them once,
at compile time, into views of preallocated buffers. `set_rows` writes into a state and returns that state,
so every reader that depends on the write is ordered after it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

LEAF_OPS = frozenset({"weight", "state", "input"})
# Ops whose result aliases their first source's buffer instead of owning one.
VIEW_OPS = frozenset({"reshape", "permute", "view_rows", "view_cols", "slice_rows", "set_rows"})

F32 = "f32"
F16 = "f16"      # KV cache storage only: ops read it, compute in f32
Q8_0 = "q8_0"    # KV cache storage only: ggml's Q8_0 blocks along the last axis (shapes count elements)
I32 = "i32"


class Tensor:
    """One node of the graph. `params` holds op parameters (hashable values only; never mutated)."""

    __slots__ = ("id", "op", "srcs", "shape", "dtype", "name", "params")

    def __init__(self, id: int, op: str, srcs: tuple["Tensor", ...], shape: tuple[int, ...], dtype: str,
                 name: str, params: dict[str, Any]):
        self.id = id
        self.op = op
        self.srcs = srcs
        self.shape = shape
        self.dtype = dtype
        self.name = name
        self.params = params

    @property
    def p(self) -> dict[str, Any]:
        return self.params

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def is_leaf(self) -> bool:
        return self.op in LEAF_OPS

    def signature(self) -> tuple:
        """Structure of this node (sources by id): equal signatures mean identical computations."""
        return (self.op, tuple(s.id for s in self.srcs), self.shape, self.dtype, self.name,
                tuple(sorted(self.params.items())))

    def __repr__(self) -> str:
        return f"Tensor(#{self.id} {self.op} {self.name!r} {self.shape} {self.dtype})"


@dataclass
class Graph:
    nodes: list[Tensor] = field(default_factory=list)
    outputs: dict[str, Tensor] = field(default_factory=dict)

    def leaves(self, op: str) -> dict[str, Tensor]:
        return {t.name: t for t in self.nodes if t.op == op}

    def signature(self) -> tuple:
        return (tuple(t.signature() for t in self.nodes), tuple((k, v.id) for k, v in self.outputs.items()))

    def __len__(self) -> int:
        return len(self.nodes)


def _broadcast(a: Sequence[int], b: Sequence[int]) -> tuple[int, ...]:
    if a == b:
        return tuple(a)
    n = max(len(a), len(b))
    a = (1,) * (n - len(a)) + tuple(a)
    b = (1,) * (n - len(b)) + tuple(b)
    out = []
    for x, y in zip(a, b):
        if x != y and 1 not in (x, y):
            raise ValueError(f"shapes {a} and {b} do not broadcast")
        out.append(max(x, y))
    return tuple(out)


class GraphBuilder:
    """Builds a Graph with a small ggml-like vocabulary of ops. Shape errors raise at build time."""

    def __init__(self) -> None:
        self.graph = Graph()
        self._leaves: dict[tuple[str, str], Tensor] = {}

    # ---- node creation ----------------------------------------------------------------------------------
    def _node(self, op: str, srcs: Sequence[Tensor], shape: Sequence[int], dtype: str = F32, name: str = "",
              **params: Any) -> Tensor:
        t = Tensor(len(self.graph.nodes), op, tuple(srcs), tuple(map(int, shape)), dtype, name, params)
        self.graph.nodes.append(t)
        return t

    def _leaf(self, op: str, name: str, shape: Sequence[int], dtype: str) -> Tensor:
        key = (op, name)
        t = self._leaves.get(key)
        if t is None:
            t = self._leaves[key] = self._node(op, (), shape, dtype, name)
        elif t.shape != tuple(shape):
            raise ValueError(f"{op} {name!r} declared with shapes {t.shape} and {tuple(shape)}")
        return t

    def weight(self, name: str, shape: Sequence[int]) -> Tensor:
        return self._leaf("weight", name, shape, F32)

    def state(self, name: str, shape: Sequence[int], dtype: str = F32) -> Tensor:
        return self._leaf("state", name, shape, dtype)

    def input(self, name: str, shape: Sequence[int], dtype: str = F32) -> Tensor:
        return self._leaf("input", name, shape, dtype)

    def output(self, name: str, t: Tensor) -> Tensor:
        self.graph.outputs[name] = t
        return t

    # ---- compute ops ------------------------------------------------------------------------------------
    def get_rows(self, table: Tensor, ids: Tensor) -> Tensor:
        return self._node("get_rows", (table, ids), (ids.shape[0],) + table.shape[1:])

    def matmul(self, a: Tensor, b: Tensor, transpose_b: bool = True) -> Tensor:
        """a @ b^T (ggml's mul_mat with weights stored [out, in]) or a @ b; leading axes broadcast."""
        bk, bn = (b.shape[-1], b.shape[-2]) if transpose_b else (b.shape[-2], b.shape[-1])
        if a.shape[-1] != bk:
            raise ValueError(f"matmul: {a.shape} x {b.shape} (transpose_b={transpose_b})")
        lead = _broadcast(a.shape[:-2], b.shape[:-2])
        return self._node("matmul", (a, b), lead + (a.shape[-2], bn), transpose_b=transpose_b)

    def _binary(self, op: str, a: Tensor, b: Tensor) -> Tensor:
        return self._node(op, (a, b), _broadcast(a.shape, b.shape))

    def add(self, a: Tensor, b: Tensor) -> Tensor:
        return self._binary("add", a, b)

    def mul(self, a: Tensor, b: Tensor) -> Tensor:
        return self._binary("mul", a, b)

    def scale(self, x: Tensor, s: float) -> Tensor:
        return self._node("scale", (x,), x.shape, s=float(s))

    def rms_norm(self, x: Tensor, eps: float) -> Tensor:
        return self._node("rms_norm", (x,), x.shape, eps=float(eps))

    def silu(self, x: Tensor) -> Tensor:
        return self._node("silu", (x,), x.shape)

    def sigmoid(self, x: Tensor) -> Tensor:
        return self._node("sigmoid", (x,), x.shape)

    def softplus(self, x: Tensor) -> Tensor:
        """log(1 + exp(x))."""
        return self._node("softplus", (x,), x.shape)

    def gelu(self, x: Tensor) -> Tensor:
        """GELU, tanh approximation (ggml_gelu)."""
        return self._node("gelu", (x,), x.shape)

    def softcap(self, x: Tensor, cap: float) -> Tensor:
        """cap * tanh(x / cap): Gemma 2's soft-capping of attention scores and final logits."""
        if not cap > 0:
            raise ValueError(f"softcap: cap must be > 0, got {cap}")
        return self._node("softcap", (x,), x.shape, cap=float(cap))

    def swiglu(self, gate: Tensor, up: Tensor) -> Tensor:
        """silu(gate) * up, fused."""
        return self._node("swiglu", (gate, up), _broadcast(gate.shape, up.shape))

    def geglu(self, gate: Tensor, up: Tensor) -> Tensor:
        """gelu_tanh(gate) * up, fused."""
        return self._node("geglu", (gate, up), _broadcast(gate.shape, up.shape))

    def matmul_glu(self, x: Tensor, w_gate: Tensor, w_up: Tensor, kind: str = "swiglu") -> Tensor:
        """swiglu (or geglu) of x @ w_gate^T and x @ w_up^T: a gated FFN's first half as one node, so that a
        backend may compute it tile by tile and the two [tokens, ffn] products never take memory."""
        if kind not in ("swiglu", "geglu") or w_gate.shape != w_up.shape or x.shape[-1] != w_gate.shape[-1] \
                or len(w_gate.shape) != 2:
            raise ValueError(f"matmul_glu: x {x.shape}, gate {w_gate.shape}, up {w_up.shape}, kind {kind!r}")
        return self._node("matmul_glu", (x, w_gate, w_up), x.shape[:-1] + (w_gate.shape[0],), kind=kind)

    def rope(self, x: Tensor, pos: Tensor, n_dims: int, base: float, neox: bool, freq_scale: float = 1.0,
             freq_factors: tuple[float, ...] | None = None) -> Tensor:
        """Rotary embedding over the last axis of x [n_tokens, n_heads, head_dim]; pos is [n_tokens] int32.
        neox=False rotates adjacent pairs (GGUF llama), neox=True rotates halves (gemma3). freq_factors:
        one divisor per pair's frequency (llama3 rope scaling: GGUF's rope_freqs.weight), constants."""
        if x.shape[0] != pos.shape[0] or n_dims > x.shape[-1] or n_dims % 2:
            raise ValueError(f"rope: x {x.shape}, pos {pos.shape}, n_dims {n_dims}")
        if freq_factors is not None and len(freq_factors) != n_dims // 2:
            raise ValueError(f"rope: {len(freq_factors)} freq_factors for {n_dims // 2} pairs")
        return self._node("rope", (x, pos), x.shape, n_dims=int(n_dims), base=float(base), neox=bool(neox),
                          freq_scale=float(freq_scale),
                          freq_factors=None if freq_factors is None else tuple(float(f) for f in freq_factors))

    def softmax(self, x: Tensor, mask: Tensor | None = None, scale: float = 1.0) -> Tensor:
        """softmax(x * scale + mask) over the last axis; mask broadcasts against x."""
        srcs = (x,) if mask is None else (x, mask)
        if mask is not None:
            _broadcast(x.shape, mask.shape)
        return self._node("softmax", srcs, x.shape, scale=float(scale))

    def flash_attn(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float,
                   pages: Tensor | None = None) -> Tensor:
        """Fused attention. q [n_tok, n_head, d], k [n_kv, n_head_kv, d], v [n_kv, n_head_kv, dv],
        mask [n_tok, n_kv] -> [n_tok, n_head, dv]. Heads are grouped: head h reads kv head h // (n_head/n_head_kv).
        pages (int32 [n_kv / page], optional): the block of positions each page of cells holds, the order in
        which a kernel that works page by page merges them (see memory/kv_cache.py)."""
        n_tok, n_head, d = q.shape
        n_kv, n_head_kv, dk = k.shape
        if (dk != d or v.shape[:2] != (n_kv, n_head_kv) or n_head % n_head_kv or mask.shape != (n_tok, n_kv)
                or (pages is not None and (pages.dtype != I32 or len(pages.shape) != 1 or not pages.shape[0]
                                           or n_kv % pages.shape[0]))):
            raise ValueError(f"flash_attn: q {q.shape} k {k.shape} v {v.shape} mask {mask.shape}"
                             + ("" if pages is None else f" pages {pages.shape}"))
        srcs = (q, k, v, mask) if pages is None else (q, k, v, mask, pages)
        return self._node("flash_attn", srcs, (n_tok, n_head, v.shape[2]), scale=float(scale))

    def cont(self, x: Tensor) -> Tensor:
        """A contiguous copy (makes a permuted view reshapeable)."""
        return self._node("cont", (x,), x.shape)

    # ---- views (no compute) -----------------------------------------------------------------------------
    def reshape(self, x: Tensor, shape: Sequence[int]) -> Tensor:
        shape = tuple(shape)
        if math.prod(shape) != x.n_elements:
            raise ValueError(f"reshape {x.shape} -> {shape}")
        return self._node("reshape", (x,), shape, x.dtype)

    def permute(self, x: Tensor, axes: Sequence[int]) -> Tensor:
        axes = tuple(axes)
        if sorted(axes) != list(range(len(x.shape))):
            raise ValueError(f"permute {x.shape} by {axes}")
        return self._node("permute", (x,), tuple(x.shape[a] for a in axes), x.dtype, axes=axes)

    def view_rows(self, x: Tensor, n: int) -> Tensor:
        """The first n rows (axis 0) of x: a KV window over cache cells."""
        if not 0 < n <= x.shape[0]:
            raise ValueError(f"view_rows {n} of {x.shape}")
        return self._node("view_rows", (x,), (n,) + x.shape[1:], x.dtype, n=int(n))

    def view_cols(self, x: Tensor, n: int) -> Tensor:
        """The first n columns (last axis) of x: a window over a transposed (non-flash-attention) V cache."""
        if not 0 < n <= x.shape[-1]:
            raise ValueError(f"view_cols {n} of {x.shape}")
        return self._node("view_cols", (x,), x.shape[:-1] + (n,), x.dtype, n=int(n))

    def slice_rows(self, x: Tensor, start: int, n: int, axis: int = 0) -> Tensor:
        """Rows [start, start + n) of x along axis (default 0), as a view."""
        if not (0 <= axis < x.ndim and 0 <= start and 0 < n and start + n <= x.shape[axis]):
            raise ValueError(f"slice_rows [{start}, {start + n}) of axis {axis} of {x.shape}")
        shape = x.shape[:axis] + (n,) + x.shape[axis + 1:]
        return self._node("slice_rows", (x,), shape, x.dtype, start=int(start), n=int(n), axis=int(axis))

    def set_rows(self, dst: Tensor, src: Tensor, idx: Tensor, transposed: bool = False, col: int = 0) -> Tensor:
        """Write src's rows into dst at row indices idx (an int32 input); returns dst after the write.
        transposed=True writes src's rows as columns of dst (the transposed V cache layout). A src narrower
        than a 2-D dst writes columns [col, col + width) of each row, so one state row can hold several
        parts written separately. Execution follows creation order, so reads of a state built before a
        write see the old value."""
        if dst.op not in ("state", "set_rows"):
            raise ValueError("set_rows writes into a state tensor")
        rows = dst.shape[1:] if not transposed else dst.shape[:-1]
        partial = not transposed and len(dst.shape) == 2 and src.ndim == 2 and (col or src.shape[1] != rows[0])
        if partial:
            rows = (src.shape[1],) if col + src.shape[1] <= dst.shape[1] else None
        if (rows is None or src.shape[0] != idx.shape[0] or tuple(src.shape[1:]) != tuple(rows)
                or idx.dtype != I32 or (col and transposed)):
            raise ValueError(f"set_rows: dst {dst.shape} src {src.shape} idx {idx.shape} transposed={transposed} "
                             f"col={col}")
        return self._node("set_rows", (dst, src, idx), dst.shape, dst.dtype, transposed=bool(transposed), col=int(col))

    # ---- recurrent (Mamba-like) layers ------------------------------------------------------------------
    def ssm_scan2(self, h0: Tensor, x: Tensor, dt: Tensor, a: Tensor, b: Tensor, c: Tensor) -> Tensor:
        """Mamba-2's selective scan, per sequence, token and head h (head_dim channels, group g(h)):
        h_h = exp(softplus(dt_h) * a_h) * h_h + softplus(dt_h) * x_h (outer) B_g; y_h = h_h @ C_g. a is one
        scalar per head; the heads split x's channels evenly and the groups split the heads. h0 [S, s, d]
        (state transposed, as ssm_scan's), x [S, n, d], dt [S, n, H], a [H], b/c [S, n, G * s] ->
        [S, n + s, d]: y, then the final state."""
        n_seqs, n, d = x.shape
        n_head = a.shape[0]
        gs = b.shape[-1]
        if (x.ndim != 3 or a.ndim != 1 or d % n_head or dt.shape != (n_seqs, n, n_head) or b.shape != c.shape
                or b.shape[:2] != (n_seqs, n) or h0.ndim != 3 or h0.shape[0] != n_seqs or h0.shape[2] != d
                or gs % h0.shape[1] or n_head % (gs // h0.shape[1])):
            raise ValueError(f"ssm_scan2: h0 {h0.shape} x {x.shape} dt {dt.shape} a {a.shape} b {b.shape} c {c.shape}")
        return self._node("ssm_scan2", (h0, x, dt, a, b, c), (n_seqs, n + h0.shape[1], d))

    def gated_delta_net(self, s0: Tensor, q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor) -> Tensor:
        """The gated delta rule (Gated DeltaNet), per sequence, token and value head h, whose query / key head
        is h // (Hv / Hk) (each key head serves Hv / Hk consecutive value heads): with S_h [dv, dk],
        S_h = exp(g_h) S_h; S_h += beta_h (v_h - S_h k) k^T; y_h = S_h q. q/k [S, n, Hk * dk] (normalised as
        the model wants), v [S, n, Hv * dv], g (log decay) and beta [S, n, Hv]; s0 [S, dk, Hv * dv]: each
        sequence's state, the heads' S_h flattened one after the other ([Hv, dv, dk]). -> [S, n + dk, Hv * dv]:
        y, then the final state in s0's layout (as ssm_scan2, so the state is a slice to write back)."""
        n_seqs, n, width_k = q.shape
        dk, width_v = s0.shape[1], v.shape[2]
        n_v = g.shape[2] if g.ndim == 3 else 0
        if (s0.ndim != 3 or k.shape != q.shape or v.shape[:2] != (n_seqs, n) or g.shape != (n_seqs, n, n_v)
                or beta.shape != g.shape or s0.shape != (n_seqs, dk, width_v) or not n_v or not 0 < dk <= width_k
                or width_k % dk or width_v % n_v or n_v % (width_k // dk)):
            raise ValueError(f"gated_delta_net: s0 {s0.shape} q {q.shape} k {k.shape} v {v.shape} g {g.shape} "
                             f"beta {beta.shape}")
        return self._node("gated_delta_net", (s0, q, k, v, g, beta), (n_seqs, n + dk, width_v))

    def moe_ffn(self, x: Tensor, router: Tensor, up: Tensor, gate: Tensor, down: Tensor, n_used: int,
                norm_weights: bool) -> Tensor:
        """A mixture-of-experts SwiGLU FFN: per token, softmax(router x) picks the n_used most probable
        experts; the output is their down(silu(gate x) * up x), weighted by those probabilities
        (renormalised to sum 1 when norm_weights). x [n, e], router [E, e], up/gate [E, f, e], down [E, e, f]."""
        n, e = x.shape
        n_exp, f = up.shape[0], up.shape[1]
        if (router.shape != (n_exp, e) or up.shape != (n_exp, f, e) or gate.shape != up.shape
                or down.shape != (n_exp, e, f) or not 0 < n_used <= n_exp):
            raise ValueError(f"moe_ffn: x {x.shape} router {router.shape} up {up.shape} gate {gate.shape} "
                             f"down {down.shape} n_used {n_used}")
        return self._node("moe_ffn", (x, router, up, gate, down), (n, e), n_used=int(n_used),
                          norm_weights=bool(norm_weights))

    def concat_rows(self, a: Tensor, b: Tensor, axis: int = 0) -> Tensor:
        """[a; b] along axis (default 0)."""
        if a.ndim != b.ndim or not 0 <= axis < a.ndim or \
                a.shape[:axis] + a.shape[axis + 1:] != b.shape[:axis] + b.shape[axis + 1:]:
            raise ValueError(f"concat_rows {a.shape} {b.shape} along axis {axis}")
        shape = a.shape[:axis] + (a.shape[axis] + b.shape[axis],) + a.shape[axis + 1:]
        return self._node("concat_rows", (a, b), shape, axis=int(axis))

    def ssm_conv(self, conv_x: Tensor, w: Tensor) -> Tensor:
        """Causal depthwise conv over time, per sequence: conv_x [(S,) k-1+n, d] (previous k-1 inputs, then n
        new ones), w [d, k] -> [(S,) n, d], y[t, c] = sum_j conv_x[t + j, c] * w[c, j]."""
        d, k = w.shape
        if conv_x.ndim not in (2, 3) or conv_x.shape[-1] != d or conv_x.shape[-2] < k:
            raise ValueError(f"ssm_conv: x {conv_x.shape} w {w.shape}")
        return self._node("ssm_conv", (conv_x, w), conv_x.shape[:-2] + (conv_x.shape[-2] - k + 1, d))

    def ssm_scan(self, h0: Tensor, x: Tensor, dt: Tensor, a: Tensor, b: Tensor, c: Tensor) -> Tensor:
        """Selective scan, per sequence and token t: h = exp(softplus(dt_t) * a) * h + softplus(dt_t) * x_t
        (outer) b_t; y_t = h @ c_t, with h [d, s]. The state travels transposed: h0 is [(S,) s, d] and the
        result is [(S,) n + s, d]: rows [0, n) are y, rows [n, n + s) the final state (one op, one output, as
        ggml's ssm_scan), so the new state is a slice that can be written back without a copy. x/dt
        [(S,) n, d], a [d, s], b/c [(S,) n, s]; S: sequences, each with its own state."""
        lead, (n, d) = x.shape[:-2], x.shape[-2:]
        s = a.shape[1]
        if (x.ndim not in (2, 3) or h0.shape != lead + (s, d) or dt.shape != x.shape or a.shape != (d, s)
                or b.shape != lead + (n, s) or c.shape != lead + (n, s)):
            raise ValueError(f"ssm_scan: h0 {h0.shape} x {x.shape} dt {dt.shape} a {a.shape} b {b.shape} c {c.shape}")
        return self._node("ssm_scan", (h0, x, dt, a, b, c), lead + (n + s, d))

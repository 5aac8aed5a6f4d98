"""The numpy reference kernels: one float32 kernel for every op of the graph IR, the ground truth for tests
and the last kernel chooser of every backend.

`KERNELS[op](node, out, *srcs)` returns a closure that computes the node with numpy into its preallocated
output buffer (`out=`; scratch space allocated here, at compile time); `view` resolves a view op into a
numpy view; `RopeTables` / `rope_kernel` share the cos / sin tables of every rope op of one run; `Program`
is what a compile returns: a flat list of closures, its input buffers and its output views.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from ..errors import IndexOutOfRangeError, out_of_range
from ..graph.ir import Tensor

Kernel = Callable[[], None]
NP_DTYPES = {"f32": np.float32, "f16": np.float16, "i32": np.int32}

# ggml's Q8_0 block: float16 scale d, then 32 int8 q (value = d * q). A q8_0 KV cache is an array of these
# along its last axis: shape [..., width / 32], while the graph's tensors count elements ([..., width]).
QK8_0 = 32
Q8_0_BLOCK = np.dtype([("d", "<f2"), ("qs", "i1", (QK8_0,))])


def is_q8_0(a) -> bool:
    return getattr(a, "dtype", None) == Q8_0_BLOCK


def element_shape(a: np.ndarray) -> tuple[int, ...]:
    """The shape of a buffer in elements (a q8_0 array's last axis counts blocks of 32)."""
    return a.shape[:-1] + (a.shape[-1] * QK8_0,) if is_q8_0(a) else a.shape


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    """float32 [..., K] -> Q8_0 blocks [..., K / 32], as ggml's quantize_row_q8_0_ref: d = max|x| / 127, q =
    x * (1 / d) rounded to nearest, halves away from zero (C's roundf), d stored as float16."""
    b = np.asarray(x, np.float32).reshape(x.shape[:-1] + (x.shape[-1] // QK8_0, QK8_0))
    d = np.abs(b).max(-1) / np.float32(127)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
    v = b * inv[..., None]
    r = np.trunc(v)
    r += np.where(np.abs(v - r) >= np.float32(0.5), np.sign(v), np.float32(0))
    out = np.empty(b.shape[:-1], Q8_0_BLOCK)
    out["d"] = d.astype(np.float16)
    out["qs"] = r.astype(np.int8)
    return out


def dequantize_q8_0(blocks: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Q8_0 blocks [..., G] -> float32 [..., 32 G] (d * q: exact in float32)."""
    v = blocks["qs"].astype(np.float32) * blocks["d"].astype(np.float32)[..., None]
    v = v.reshape(blocks.shape[:-1] + (blocks.shape[-1] * QK8_0,))
    if out is None:
        return v
    np.copyto(out, v)
    return out


class Program:
    """A compiled graph: input buffers to write, kernels to run, output views to read."""

    def __init__(self, kernels: list[Kernel], inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray],
                 arena_bytes: int):
        self.kernels = kernels
        self.inputs = inputs
        self.outputs = outputs
        self.arena_bytes = arena_bytes

    def run(self) -> None:
        for k in self.kernels:
            k()


# ---- kernels: each factory gets the node, its output buffer and its source buffers --------------------------
def _k_matmul(t: Tensor, out, a, b):
    bt = np.swapaxes(b, -1, -2) if t.p["transpose_b"] else b
    return lambda: np.matmul(a, bt, out=out)


def check_indices(idx: np.ndarray, n: int, where: str) -> None:
    """Refuse indices outside [0, n): numpy would wrap a negative one to another row (and a torch or C
    kernel would read past the table), so every indexing kernel checks before it reads or writes."""
    bad = out_of_range(idx, n)
    if bad is not None:
        raise IndexOutOfRangeError(f"index {bad} outside a table of {n} rows reached {where}; the step was "
                                   "refused (an out-of-range token id or cache slot).")


def _k_get_rows(t, out, table, ids):
    def run():
        check_indices(ids, table.shape[0], "get_rows")
        np.take(table, ids, axis=0, out=out)
    return run


def _k_add(t, out, a, b):
    return lambda: np.add(a, b, out=out)


def _k_mul(t, out, a, b):
    return lambda: np.multiply(a, b, out=out)


def _k_scale(t, out, x):
    s = np.float32(t.p["s"])
    return lambda: np.multiply(x, s, out=out)


def _k_cont(t, out, x):
    return lambda: np.copyto(out, x)


def _k_rms_norm(t, out, x):
    ss = np.empty(x.shape[:-1] + (1,), np.float32)
    eps = np.float32(t.p["eps"])

    def run():
        np.multiply(x, x, out=out)
        np.mean(out, axis=-1, keepdims=True, out=ss)
        ss.__iadd__(eps)
        np.sqrt(ss, out=ss)
        np.divide(x, ss, out=out)
    return run


def _silu_into(x, out):
    np.negative(x, out=out)
    np.exp(out, out=out)
    out += 1.0
    np.divide(x, out, out=out)


_GELU_C = np.float32(math.sqrt(2.0 / math.pi))


def _gelu_into(x, out):
    np.multiply(x, x, out=out)
    np.multiply(out, x, out=out)
    out *= np.float32(0.044715)
    out += x
    out *= _GELU_C
    np.tanh(out, out=out)
    out += 1.0
    out *= x
    out *= np.float32(0.5)


def _k_sigmoid(t, out, x):
    def run():
        np.negative(x, out=out)
        with np.errstate(over="ignore"):      # exp(-x) = inf for x << 0: the result is 0, as it should be
            np.exp(out, out=out)
        np.add(out, np.float32(1.0), out=out)
        np.reciprocal(out, out=out)
    return run


def _k_softplus(t, out, x):
    return lambda: np.logaddexp(x, np.float32(0.0), out=out)     # stable for large |x|


def _k_silu(t, out, x):
    return lambda: _silu_into(x, out)


def _k_gelu(t, out, x):
    return lambda: _gelu_into(x, out)


def _k_softcap(t, out, x):
    cap, inv = np.float32(t.p["cap"]), np.float32(1.0 / t.p["cap"])

    def run():
        np.multiply(x, inv, out=out)
        np.tanh(out, out=out)
        np.multiply(out, cap, out=out)
    return run


def _gated(act, out, gate, up):
    def run():
        a = np.empty_like(out)      # not out: the plan may give out the gate's or the up's buffer (in place)
        act(gate, a)
        np.multiply(a, up, out=out)
    return run


def _k_matmul_glu(t, out, x, w_gate, w_up):
    act = _silu_into if t.p["kind"] == "swiglu" else _gelu_into

    def run():          # the products are temporaries here (the plan gives them no memory)
        gate, up = np.matmul(x, np.swapaxes(w_gate, -1, -2)), np.matmul(x, np.swapaxes(w_up, -1, -2))
        a = np.empty_like(gate)
        act(gate, a)
        np.multiply(a, up, out=out)
    return run


def _k_swiglu(t, out, gate, up):
    return _gated(_silu_into, out, gate, up)


def _k_geglu(t, out, gate, up):
    return _gated(_gelu_into, out, gate, up)


def _softmax_inplace(s: np.ndarray, m: np.ndarray) -> None:
    np.max(s, axis=-1, keepdims=True, out=m)
    np.subtract(s, m, out=s)
    np.exp(s, out=s)
    np.sum(s, axis=-1, keepdims=True, out=m)
    np.divide(s, m, out=s)


def _k_softmax(t, out, x, mask=None):
    m = np.empty(out.shape[:-1] + (1,), np.float32)
    scale = np.float32(t.p["scale"])

    def run():
        np.multiply(x, scale, out=out)
        if mask is not None:
            np.add(out, mask, out=out)
        _softmax_inplace(out, m)
    return run


def _k_flash_attn(t, out, q, k, v, mask, pages=None):   # one pass over every cell: pages change nothing
    if is_q8_0(k) or is_q8_0(v):          # a q8_0 cache: its windows dequantized to float32 at every run
        kq, vq = k, v
        k = np.empty(element_shape(kq), np.float32) if is_q8_0(kq) else kq
        v = np.empty(element_shape(vq), np.float32) if is_q8_0(vq) else vq
        attend = _k_flash_attn(t, out, q, k, v, mask)

        def run_q8():
            for src, dst in ((kq, k), (vq, v)):
                if is_q8_0(src):
                    dequantize_q8_0(src, dst)
            attend()
        return run_q8
    n_tok, n_head, d = q.shape
    n_kv, n_head_kv, dv = v.shape
    g = n_head // n_head_kv
    qs = np.empty((n_head_kv, g, n_tok, d), np.float32)       # q regrouped per kv head
    s = np.empty((n_head_kv, g * n_tok, n_kv), np.float32)    # scores
    m = np.empty((n_head_kv, g, n_tok, 1), np.float32)
    o = np.empty((n_head_kv, g * n_tok, dv), np.float32)
    q_grouped = q.reshape(n_tok, n_head_kv, g, d).transpose(1, 2, 0, 3)
    kt = k.transpose(1, 2, 0)                                 # [n_head_kv, d, n_kv]
    vh = v.transpose(1, 0, 2)                                 # [n_head_kv, n_kv, dv]
    s4 = s.reshape(n_head_kv, g, n_tok, n_kv)
    out_grouped = out.reshape(n_tok, n_head_kv, g, dv)
    o_view = o.reshape(n_head_kv, g, n_tok, dv).transpose(2, 0, 1, 3)
    qs3 = qs.reshape(n_head_kv, g * n_tok, d)
    scale = np.float32(t.p["scale"])

    def run():
        np.multiply(q_grouped, scale, out=qs)
        np.matmul(qs3, kt, out=s)
        np.add(s4, mask, out=s4)
        _softmax_inplace(s4, m)
        np.matmul(s, vh, out=o)
        np.copyto(out_grouped, o_view)
    return run


def _k_set_rows(t, out, dst, src, idx):
    if is_q8_0(dst):                      # rows quantized to Q8_0 blocks (a q8_0 KV cache: whole rows, never transposed)
        if t.p["transposed"] or t.p["col"] or dst.ndim != 2:
            raise ValueError("set_rows into a q8_0 buffer writes whole rows")

        def run_q8():
            check_indices(idx, dst.shape[0], "set_rows")
            dst[idx] = quantize_q8_0(src.reshape(src.shape[0], -1))
        return run_q8
    if dst.ndim == 2 and not t.p["transposed"]:
        col = t.p["col"]
        part = dst[:, col: col + src.shape[-1]]   # the whole row unless a partial write

        def run():
            check_indices(idx, part.shape[0], "set_rows")
            part[idx] = src
        return run
    if t.p["transposed"]:
        src_t = src.T

        def run():
            check_indices(idx, dst.shape[1], "set_rows")
            dst[:, idx] = src_t
        return run

    def run():
        check_indices(idx, dst.shape[0], "set_rows")
        dst[idx] = src
    return run


def _k_concat_rows(t, out, a, b):
    lead = (slice(None),) * t.p.get("axis", 0)
    na = a.shape[len(lead)]
    top, bottom = out[lead + (slice(0, na),)], out[lead + (slice(na, None),)]

    def run():
        np.copyto(top, a)
        np.copyto(bottom, b)
    return run


def _k_ssm_conv(t, out, conv_x, w):
    n, k = out.shape[-2], w.shape[1]
    tmp = np.empty(out.shape, np.float32)
    taps = [(conv_x[..., j: j + n, :], np.ascontiguousarray(w[:, j])) for j in range(k)]

    def run():
        out.fill(0.0)
        for xs, wj in taps:
            np.multiply(xs, wj, out=tmp)
            np.add(out, tmp, out=out)
    return run


def _k_ssm_scan(t, out, h0, x, dt, a, b, c):
    if x.ndim == 3:                            # S sequences, each from its own state
        runs = [_k_ssm_scan(t, out[i], h0[i], x[i], dt[i], a, b[i], c[i]) for i in range(x.shape[0])]
        return lambda: [r() for r in runs]
    n, d = x.shape
    h = np.empty(a.shape, np.float32)          # running state [d, s]
    sp = np.empty(dt.shape, np.float32)        # softplus(dt)
    dx = np.empty(x.shape, np.float32)         # softplus(dt) * x
    decay = np.empty(a.shape, np.float32)
    inj = np.empty(a.shape, np.float32)
    y, h_out = out[:n], out[n:].T              # h_out: [d, s] view of the state rows

    def run():
        np.copyto(h, h0.T)
        np.logaddexp(dt, np.float32(0.0), out=sp)   # softplus, stable for large |dt|
        np.multiply(sp, x, out=dx)
        for i in range(n):
            np.multiply(sp[i][:, None], a, out=decay)
            np.exp(decay, out=decay)
            np.multiply(h, decay, out=h)
            np.multiply(dx[i][:, None], b[i][None, :], out=inj)
            np.add(h, inj, out=h)
            np.matmul(h, c[i], out=y[i])
        np.copyto(h_out, h)
    return run


def _k_ssm_scan2(t, out, h0, x, dt, a, b, c):
    n_seqs, n, d = x.shape
    n_head, s = a.shape[0], h0.shape[1]
    hd, n_group = d // n_head, b.shape[-1] // s
    group_of_head = np.arange(n_head) // (n_head // n_group)
    h = np.empty((n_head, hd, s), np.float32)             # running state of one sequence
    sp = np.empty(dt.shape, np.float32)

    def run():
        np.logaddexp(dt, np.float32(0.0), out=sp)       # softplus
        for q in range(n_seqs):
            np.copyto(h, h0[q].T.reshape(n_head, hd, s))
            xs = x[q].reshape(n, n_head, hd)
            bs = b[q].reshape(n, n_group, s)[:, group_of_head]    # [n, H, s]
            cs = c[q].reshape(n, n_group, s)[:, group_of_head]
            ys = out[q, :n].reshape(n, n_head, hd)
            for i in range(n):
                np.multiply(h, np.exp(sp[q, i] * a)[:, None, None], out=h)
                np.add(h, (sp[q, i][:, None] * xs[i])[:, :, None] * bs[i][:, None, :], out=h)
                np.einsum("hds,hs->hd", h, cs[i], out=ys[i])
            np.copyto(out[q, n:], h.reshape(d, s).T)
    return run


def _k_gated_delta_net(t, out, s0, q, k, v, g, beta):
    n_seqs, n, width_v = v.shape
    dk, n_v = s0.shape[1], g.shape[2]
    dv, n_k = width_v // n_v, q.shape[2] // dk
    key_head = np.arange(n_v) // (n_v // n_k)              # the query / key head of each value head
    h = np.empty((n_v, dv, dk), np.float32)                # one sequence's running state
    kv = np.empty((n_v, dv), np.float32)
    decay = np.empty(g.shape, np.float32)

    def run():
        np.exp(g, out=decay)
        for s in range(n_seqs):
            np.copyto(h, s0[s].reshape(n_v, dv, dk))
            qs, ks = q[s].reshape(n, n_k, dk)[:, key_head], k[s].reshape(n, n_k, dk)[:, key_head]   # [n, Hv, dk]
            vs, ys = v[s].reshape(n, n_v, dv), out[s, :n].reshape(n, n_v, dv)
            for i in range(n):
                np.multiply(h, decay[s, i][:, None, None], out=h)
                np.einsum("hvk,hk->hv", h, ks[i], out=kv)
                np.subtract(vs[i], kv, out=kv)
                np.multiply(kv, beta[s, i][:, None], out=kv)
                np.add(h, kv[:, :, None] * ks[i][:, None, :], out=h)
                np.einsum("hvk,hk->hv", h, qs[i], out=ys[i])
            np.copyto(out[s, n:].reshape(n_v, dv, dk), h)
    return run


def _k_moe_ffn(t, out, x, router, up, gate, down):
    k, norm = t.p["n_used"], t.p["norm_weights"]

    def run():
        logits = x @ router.T
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        chosen = np.argsort(-probs, axis=1, kind="stable")[:, :k]          # [n, k], most probable first
        weights = np.take_along_axis(probs, chosen, axis=1)
        if norm:
            weights /= np.maximum(weights.sum(axis=1, keepdims=True), np.float32(6.103515625e-5))
        out.fill(0.0)
        for expert in np.unique(chosen):
            rows, slot = np.nonzero(chosen == expert)
            xe = x[rows]
            g = xe @ gate[expert].T
            h = g / (np.float32(1.0) + np.exp(-g)) * (xe @ up[expert].T)             # silu(gate x) * up x
            out[rows] += weights[rows, slot][:, None] * (h @ down[expert].T)
    return run


def rope_inv_freq(p: dict) -> np.ndarray:
    """A rope node's per-pair frequencies, freq_scale / base^(2i / n_dims) / freq_factor_i, in float32 (every
    backend's)."""
    i = np.arange(0, p["n_dims"] // 2, dtype=np.float64)
    inv = p["freq_scale"] / p["base"] ** (i * 2 / p["n_dims"])
    if p.get("freq_factors") is not None:
        inv = inv / np.asarray(p["freq_factors"], np.float64)
    return inv.astype(np.float32)


def rope_table_key(t: Tensor) -> tuple:
    """Rope ops whose cos/sin tables are the same: same positions input and the same frequencies."""
    p = t.p
    return t.srcs[1].id, p["n_dims"], p["base"], p["freq_scale"], p.get("freq_factors")


class RopeTables:
    """cos/sin tables shared by every rope op with the same positions and frequencies.

    They are computed once per run by the first rope kernel that needs them (positions are an input), not
    once per layer."""

    def __init__(self) -> None:
        self.tables: dict[tuple, tuple[np.ndarray, np.ndarray, Kernel]] = {}

    def get(self, t: Tensor, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray, Kernel | None]:
        p = t.p
        key = rope_table_key(t)
        if key in self.tables:
            cos, sin, _ = self.tables[key]
            return cos, sin, None
        half = p["n_dims"] // 2
        inv_freq = rope_inv_freq(p)
        theta = np.empty((pos.shape[0], half), np.float32)
        cos = np.empty((pos.shape[0], 1, half), np.float32)
        sin = np.empty((pos.shape[0], 1, half), np.float32)
        pos_col = pos.reshape(-1, 1)

        def run():
            np.multiply(pos_col, inv_freq, out=theta)
            np.cos(theta, out=cos[:, 0, :])
            np.sin(theta, out=sin[:, 0, :])
        self.tables[key] = (cos, sin, run)
        return cos, sin, run


def rope_kernel(t: Tensor, out, x, cos, sin) -> Kernel:
    n_dims = t.p["n_dims"]
    half = n_dims // 2
    if t.p["neox"]:
        x0, x1, o0, o1 = x[..., :half], x[..., half:n_dims], out[..., :half], out[..., half:n_dims]
    else:
        x0, x1, o0, o1 = x[..., 0:n_dims:2], x[..., 1:n_dims:2], out[..., 0:n_dims:2], out[..., 1:n_dims:2]
    tmp = np.empty(x0.shape, np.float32)
    rest = n_dims < x.shape[-1]

    def run():
        np.multiply(x0, cos, out=o0)
        np.multiply(x1, sin, out=tmp)
        np.subtract(o0, tmp, out=o0)
        np.multiply(x0, sin, out=o1)
        np.multiply(x1, cos, out=tmp)
        np.add(o1, tmp, out=o1)
        if rest:
            out[..., n_dims:] = x[..., n_dims:]
    return run


# Ops whose kernels here call numpy's BLAS (matmul / einsum)
BLAS_OPS = frozenset({"matmul", "matmul_glu", "flash_attn", "ssm_scan", "ssm_scan2", "moe_ffn"})

KERNELS: dict[str, Callable[..., Kernel]] = {
    "matmul": _k_matmul, "get_rows": _k_get_rows, "add": _k_add, "mul": _k_mul, "scale": _k_scale,
    "cont": _k_cont, "rms_norm": _k_rms_norm, "silu": _k_silu, "gelu": _k_gelu, "swiglu": _k_swiglu,
    "matmul_glu": _k_matmul_glu,
    "softcap": _k_softcap,
    "geglu": _k_geglu, "softmax": _k_softmax, "flash_attn": _k_flash_attn, "set_rows": _k_set_rows,
    "concat_rows": _k_concat_rows, "ssm_conv": _k_ssm_conv, "ssm_scan": _k_ssm_scan,
    "ssm_scan2": _k_ssm_scan2, "moe_ffn": _k_moe_ffn, "sigmoid": _k_sigmoid, "softplus": _k_softplus,
    "gated_delta_net": _k_gated_delta_net,
}


def view(t: Tensor, src: np.ndarray) -> np.ndarray:
    """Resolve a view op into a numpy view; never copies (a non-viewable reshape is a graph bug)."""
    if t.op == "reshape":
        v = src.view()
        try:
            v.shape = t.shape[:-1] + (t.shape[-1] // QK8_0,) if is_q8_0(src) else t.shape
        except AttributeError:
            raise ValueError(f"reshape of non-contiguous {t.srcs[0]} to {t.shape}: insert cont()") from None
        return v
    if t.op == "permute":
        return src.transpose(t.p["axes"])
    if t.op == "view_rows":
        return src[: t.p["n"]]
    if t.op == "view_cols":
        return src[..., : t.p["n"]]
    if t.op == "slice_rows":
        return src[(slice(None),) * t.p.get("axis", 0) + (slice(t.p["start"], t.p["start"] + t.p["n"]),)]
    if t.op == "set_rows":
        return src
    raise AssertionError(t.op)

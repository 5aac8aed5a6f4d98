"""Kernels for the non-matmul ops of a step, bound to numpy buffers (see kernels.c). Each builder returns a
kernel, or None when the buffers' layout is one the C code does not take (the caller then uses torch)."""
from __future__ import annotations

import numpy as np

from ...graph.ir import Tensor
from ..reference import Q8_0_BLOCK, QK8_0, is_q8_0, rope_inv_freq
from ..quant_repack import AnyRows, Q8_0Rows
from . import ACT_KINDS, GATED_KINDS, PACK_TYPES, bind, f64_bits, ptr

F4 = 4      # bytes per float32 / int32
SEG = 256   # cells per segment of the attention kernel (kernels.c), the KV cache's page
Q8_MAX_BLOCKS = 32   # kernels.c's: q8_0 K / V heads of at most 1024 values
OPS = frozenset({"rms_norm", "swiglu", "geglu", "rope", "flash_attn", "add", "mul", "scale",  # for_node's
                 "moe_ffn", "ssm_conv", "ssm_scan", "ssm_scan2", "silu", "sigmoid", "softplus", "cont", "concat_rows",
                 "gated_delta_net"})


def for_node(t: Tensor, out: np.ndarray, srcs: list[np.ndarray]):
    """The C kernel for graph node t (its output buffer and its sources as numpy arrays), or None when its op
    has none here (matmuls, state writes and the fused norm x weight are bound by the compilers)."""
    if t.op == "rms_norm":
        return rms_norm(srcs[0], None, t.p["eps"], out)
    if t.op in ("swiglu", "geglu"):
        return gated(t.op, srcs[0], srcs[1], out)
    if t.op == "rope":
        return rope(srcs[0], srcs[1], out, t.p["n_dims"], rope_inv_freq(t.p), t.p["neox"])
    if t.op == "flash_attn":
        return attention(*srcs[:4], t.p["scale"], out, *srcs[4:])
    if t.op == "add":
        return add(*srcs, out)
    if t.op == "mul":
        return mul_rows(srcs[0], srcs[1], out)
    if t.op == "scale":
        return mul_rows(srcs[0], None, out, t.p["s"])
    if t.op == "moe_ffn":
        return moe_ffn(*srcs, out, t.p["n_used"], t.p["norm_weights"])
    if t.op == "ssm_conv":
        return ssm_conv(*srcs, out)
    if t.op in ("ssm_scan", "ssm_scan2"):
        return ssm_scan(t.op, *srcs, out, a_const=t.srcs[3].op == "weight")
    if t.op == "silu":
        return act("swiglu", srcs[0], out)
    if t.op in ("sigmoid", "softplus"):
        return act(t.op, srcs[0], out)
    if t.op == "gated_delta_net":
        return gated_delta_net(*srcs, out)
    if t.op == "cont":
        return copy([(srcs[0], out)])
    if t.op == "concat_rows":
        axis, na = t.p["axis"], srcs[0].shape[t.p["axis"]]
        lead = (slice(None),) * axis
        return copy([(srcs[0], out[lead + (slice(0, na),)]), (srcs[1], out[lead + (slice(na, None),)])])
    return None


def get_rows(table: np.ndarray, ids: np.ndarray, out: np.ndarray):
    """out[i] = table[ids[i]] for a float32 table whose rows are contiguous (a recurrent state's, or a range of
    its columns)."""
    if (table.dtype != np.float32 or out.dtype != np.float32 or ids.dtype != np.int32 or ids.ndim != 1
            or not ids.flags.c_contiguous or table.shape[0] == 0):
        return None
    t2, o2 = (a if a.ndim == 2 and a.strides[1] == F4 else a.reshape(a.shape[0], -1) if a.flags.c_contiguous
              else None for a in (table, out))     # 2-D: a column range of a state's rows is taken as it is
    if t2 is None or o2 is None or o2.shape != (ids.shape[0], t2.shape[1]):
        return None
    return bind("kvg_get_rows_f32", ptr(t2), t2.shape[0], t2.shape[1], t2.strides[0] // F4, ptr(ids), ids.shape[0],
                ptr(o2), o2.strides[0] // F4, keep=(table, ids, out), indexes=True)


def _seq_rows(a: np.ndarray) -> tuple[int, int] | None:
    """(sequence stride, row stride) in floats of a float32 [(S,) rows, cols] whose columns are contiguous."""
    if a.dtype != np.float32 or a.ndim not in (2, 3) or a.strides[-1] != F4 or any(st % F4 for st in a.strides):
        return None
    return (a.strides[0] // F4 if a.ndim == 3 else 0), a.strides[-2] // F4


MAX_STATE = 256     # kernels.c's SSM_MAX_STATE


MAX_TAPS = 16       # kernels.c's CONV_MAX_K: more taps run by rows, never in place


def ssm_conv(x: np.ndarray, w: np.ndarray, out: np.ndarray, window: np.ndarray | None = None,
             ids: np.ndarray | None = None):
    """The causal depthwise convolution (kvg_ssm_conv): x [(S,) k-1+n, d], w [d, k] -> out [(S,) n, d].
    window (float32 [n_slots, (k-1) d], columns of a state table) and ids (int32 [S]): in place instead. x
    is then [S, n, d], the new inputs only; sequence q's earlier k - 1 are window[ids[q]], which gets the
    last k - 1 inputs."""
    xr, orow = _seq_rows(x), _seq_rows(out)
    if xr is None or orow is None or x.ndim != out.ndim:
        return None
    if w.dtype != np.float32 or not w.flags.c_contiguous:    # bound once: a copy here would go stale
        return None
    n, d = out.shape[-2:]
    k = w.shape[1]
    n_seqs = x.shape[0] if x.ndim == 3 else 1
    slots = (0, 0, 0, 0)
    if ids is not None:
        if (k > MAX_TAPS or x.ndim != 3 or x.shape[1] != n or ids.dtype != np.int32 or ids.shape != (n_seqs,)
                or not ids.flags.c_contiguous or window.dtype != np.float32 or window.ndim != 2
                or window.shape[1] != (k - 1) * d or window.strides[1] != F4):
            return None
        slots = (ptr(ids), window.shape[0], ptr(window), window.strides[0] // F4)
    return bind("kvg_ssm_conv", ptr(x), n_seqs, n, d, *xr, ptr(w), k, ptr(out), *orow, *slots,
                keep=(x, w, out, window, ids), indexes=ids is not None)


def ssm_scan(op: str, h0: np.ndarray, x: np.ndarray, dt: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray,
             out: np.ndarray, ids: np.ndarray | None = None, a_const: bool = False):
    """Mamba-1's (ssm_scan: a [d, s]) or Mamba-2's (ssm_scan2: a [H], b/c [S, n, G s]) selective scan
    (kvg_ssm_scan / kvg_ssm_scan2): out [(S,) n + s, d], y then the new state (transposed, as h0).
    ids (int32 [S]): in place instead. h0 is then the state table's columns holding the state, [n_slots, s,
    d] (a view of a float32 [n_slots, row] table), sequence q's state is h0[ids[q]] and its new state is
    written there; out's state rows are left alone. a_const: a never changes (a weight), so Mamba-1's decode
    reads a transposed copy made here."""
    rows = [_seq_rows(v) for v in (h0, x, dt, b, c, out)]
    if any(r is None for r in rows) or len({v.ndim for v in (h0, x, dt, b, c, out)}) != 1:
        return None
    if a.dtype != np.float32 or not a.flags.c_contiguous:    # bound once: a copy here would go stale
        return None
    n, d = x.shape[-2:]
    s = h0.shape[-2]
    if s > MAX_STATE:
        return None
    n_seqs = x.shape[0] if x.ndim == 3 else 1
    if ids is not None and (ids.dtype != np.int32 or ids.shape != (n_seqs,) or not ids.flags.c_contiguous
                            or h0.ndim != 3 or h0.strides[1] != d * F4):
        return None
    heads = (a.shape[0], b.shape[-1] // s) if op == "ssm_scan2" else (0, 0)
    (h0s, xs, dts, bs, cs, outs) = rows
    in_place = (ptr(ids), h0.shape[0]) if ids is not None else (0, 0)
    at = np.ascontiguousarray(a.T) if a_const and op == "ssm_scan" else None
    return bind(f"kvg_{op}", ptr(h0), *h0s, ptr(x), *xs, ptr(dt), *dts, ptr(a), ptr(b), *bs, ptr(c), *cs, ptr(out),
                *outs, n_seqs, n, d, s, *heads, *in_place, ptr(at) if at is not None else 0,
                keep=(h0, x, dt, a, b, c, out, ids, at), indexes=ids is not None)


def gated_delta_net(s0: np.ndarray, q: np.ndarray, k: np.ndarray, v: np.ndarray, g: np.ndarray, beta: np.ndarray,
                    out: np.ndarray, ids: np.ndarray | None = None):
    """The gated delta rule (kvg_gated_delta_net): float32 [S, n, width] inputs with unit-stride rows, each
    sequence's state rows (s0 [S, dk, Hv dv], out's last dk rows) contiguous. ids (int32 [S]): in place
    instead, s0 then the state table's columns holding the state, [n_slots, dk, Hv dv]; sequence q's state
    is s0[ids[q]], updated there (out's state rows are left alone)."""
    arrays = (s0, q, k, v, g, beta, out)
    if not all(a.dtype == np.float32 and a.ndim == 3 and a.strides[2] == F4 and all(st % F4 == 0 for st in a.strides)
               for a in arrays) or any(a.strides[1] != a.shape[2] * F4 for a in (s0, out)):
        return None
    n_seqs, n, width_k = q.shape
    if ids is not None and (ids.dtype != np.int32 or ids.shape != (n_seqs,) or not ids.flags.c_contiguous):
        return None
    dk, n_v = s0.shape[1], g.shape[2]
    st = [(a.strides[0] // F4, a.strides[1] // F4) for a in (q, k, v, g, beta, out)]
    in_place = (ptr(ids), s0.shape[0]) if ids is not None else (0, 0)
    return bind("kvg_gated_delta_net", ptr(s0), s0.strides[0] // F4, ptr(q), *st[0], ptr(k), *st[1], ptr(v), *st[2],
                ptr(g), *st[3], ptr(beta), *st[4], ptr(out), *st[5], n_seqs, n, width_k // dk, n_v, dk,
                v.shape[2] // n_v, *in_place, keep=(arrays, ids), indexes=ids is not None)


def moe_ffn(x: np.ndarray, router: np.ndarray, up: np.ndarray, gate: np.ndarray, down: np.ndarray,
            out: np.ndarray, n_used: int, norm: bool):
    """A mixture-of-experts SwiGLU FFN token by token (kvg_moe_f32): float32, rows contiguous."""
    arrays = (x, router, up, gate, down, out)
    if not all(a.dtype == np.float32 and a.strides[-1] == F4 for a in arrays) or not all(
            a.flags.c_contiguous for a in (router, up, gate, down)):
        return None
    return bind("kvg_moe_f32", ptr(x), x.shape[0], x.shape[1], ptr(router), router.shape[0], ptr(up), ptr(gate),
                ptr(down), up.shape[1], ptr(out), int(n_used), int(norm), x.strides[0] // F4, out.strides[0] // F4,
                keep=arrays)


def mul_rows(x: np.ndarray, w: np.ndarray | None, out: np.ndarray, s: float = 1.0):
    """out = x * w with w one row broadcast over x's rows, w of x's shape, or w [P, 1] one value per row of x
    [..., P, k] (a scale per head); w None: out = x * s. Contiguous float32."""
    if not all(a.dtype == np.float32 and a.flags.c_contiguous for a in (x, out)) or x.shape != out.shape:
        return None
    k = x.shape[-1] if x.ndim else 1
    if w is not None and w.shape == x.shape and x.ndim:     # elementwise: one row as long as x
        k = x.size
        w = w.reshape(-1) if w.flags.c_contiguous else w
    per_row = w.shape[0] if w is not None and x.ndim >= 2 and w.shape == (x.shape[-2], 1) and k > 1 else 0
    if w is not None and (w.dtype != np.float32 or (w.shape != (k,) and not per_row) or not w.flags.c_contiguous):
        return None
    return bind("kvg_mul_rows", ptr(x), 0 if w is None else ptr(w), ptr(out), x.size // k, k, f64_bits(s), per_row,
                keep=(x, w, out))


def add(a: np.ndarray, b: np.ndarray, out: np.ndarray):
    """out = a + b for contiguous float32 arrays, b of a's shape (the residual adds) or one row of its last
    axis (a bias); None otherwise."""
    if not (a.shape == out.shape and a.ndim and all(x.dtype == np.float32 and x.flags.c_contiguous
                                                    for x in (a, b, out))):
        return None
    if b.shape == a.shape:
        k = 0
    elif b.shape[-1:] == a.shape[-1:] and b.size == a.shape[-1]:
        k = b.size
    else:
        return None
    return bind("kvg_add", ptr(a), ptr(b), ptr(out), out.size, k, keep=(a, b, out))


def act(kind: str, x: np.ndarray, out: np.ndarray):
    """out = act(x) row by row (kvg_act: kvg_gated's activations alone, sigmoid, softplus), float32 of one
    shape whose rows (the last axis) are contiguous and evenly spaced (a slice of heads, as well)."""
    xr, orow = _even_rows(x), _even_rows(out)
    if x.shape != out.shape or xr is None or orow is None:
        return None
    (m, k, xs), (_, _, os_) = xr, orow
    return bind("kvg_act", ptr(x), ptr(out), m, k, ACT_KINDS[kind], xs, os_, keep=(x, out))


def _even_rows(a: np.ndarray) -> tuple[int, int, int] | None:
    """(rows, K, row stride in floats) of float32 a seen as rows of its last axis, contiguous and evenly
    spaced (_as_3d's [A, B, K] whose A steps over B whole rows), else None."""
    s3 = _as_3d(a)
    if s3 is None:
        return None
    (n_a, n_b, k), (s_a, s_b, _) = s3
    if n_a > 1 and n_b > 1 and s_a != n_b * s_b:
        return None
    return n_a * n_b, k, s_b if n_b > 1 else s_a if n_a > 1 else k


def _as_3d(a: np.ndarray) -> tuple[list[int], list[int]] | None:
    """(shape, strides in floats) of float32 a seen as [A, B, C] with unit-stride rows (leading axes merged
    where they are evenly spaced), or None."""
    if a.dtype != np.float32 or a.ndim == 0 or a.strides[-1] != F4 or any(st % F4 for st in a.strides):
        return None
    shape, strides = list(a.shape), [st // F4 for st in a.strides]
    while len(shape) > 3:
        if strides[0] != shape[1] * strides[1]:
            return None
        shape[:2], strides[:2] = [shape[0] * shape[1]], [strides[1]]
    pad = 3 - len(shape)
    return [1] * pad + shape, [0] * pad + strides


def copy(parts: list[tuple[np.ndarray, np.ndarray]]):
    """dst[...] = src for each (src, dst) of one shape, float32 with unit-stride rows (kvg_copy): cont of a
    view, the halves of a concat_rows."""
    slots = [len(parts)]
    for src, dst in parts:
        s3, d3 = _as_3d(src), _as_3d(dst)
        if s3 is None or d3 is None or src.shape != dst.shape:
            return None
        slots += [ptr(src), ptr(dst), *s3[0], *s3[1][:2], *d3[1][:2]]
    return bind("kvg_copy", *slots, keep=tuple(parts))


KQUANT_ROWS = ("Q4_K", "Q5_K", "Q6_K")


def embedding_rows(reader, ids: np.ndarray, out: np.ndarray):
    """The token-embedding lookup of a Q8_0 table (quant_repack.Q8_0Rows) or a K-quant one (AnyRows: packed
    row by row into a tile and read back, kvg_kquant_rows) in C; None for other readers."""
    if isinstance(reader, AnyRows) and reader.type_name in KQUANT_ROWS:
        data = reader.data
        if (data.ndim != 2 or data.strides[1] != 1 or ids.dtype != np.int32 or out.dtype != np.float32
                or not out.flags.c_contiguous or out.shape[1] % 256):
            return None
        n, k = out.shape
        return bind("kvg_kquant_rows", ptr(data), data.strides[0], PACK_TYPES[reader.type_name][0], k, ptr(ids), n,
                    ptr(out), data.shape[0], keep=(data, ids, out), indexes=True)
    if not isinstance(reader, Q8_0Rows):
        return None
    data = reader.data
    if (not data.flags.c_contiguous or ids.dtype != np.int32
            or out.dtype != np.float32 or not out.flags.c_contiguous):
        return None
    n, k = out.shape
    return bind("kvg_get_rows_q8_0", ptr(data), data.strides[0], ptr(ids), n, k, ptr(out), data.shape[0],
                keep=(data, ids, out), indexes=True)


def _rows(x: np.ndarray) -> tuple[int, int, int] | None:
    """(M, K, row stride in elements) of a float32 array seen as [M, K] with unit-stride rows, else None."""
    if x.dtype != np.float32 or x.ndim == 0 or x.strides[-1] != F4:
        return None
    if x.ndim == 1:
        return 1, x.shape[0], x.shape[0]
    if x.ndim > 2:
        if not x.flags.c_contiguous:
            return None
        x = x.reshape(-1, x.shape[-1])
    return x.shape[0], x.shape[1], x.strides[0] // F4


def rms_norm(x: np.ndarray, w: np.ndarray | None, eps: float, out: np.ndarray):
    xr, orow = _rows(x), _rows(out)
    if xr is None or orow is None or xr[:2] != orow[:2]:
        return None
    if w is not None:
        w = np.ascontiguousarray(w, np.float32)
        if w.shape != (xr[1],):
            return None
    return bind("kvg_rms_norm", ptr(x), xr[0], xr[1], xr[2], 0 if w is None else ptr(w), f64_bits(eps), ptr(out),
                orow[2], keep=(x, w, out))


def gated(kind: str, gate: np.ndarray, up: np.ndarray, out: np.ndarray):
    if not all(a.dtype == np.float32 and a.flags.c_contiguous for a in (gate, up, out)) or not (
            gate.shape == up.shape == out.shape):
        return None
    return bind("kvg_gated", ptr(gate), ptr(up), ptr(out), out.size, GATED_KINDS[kind],
                keep=(gate, up, out))


def _heads(x: np.ndarray, dtype=np.float32) -> bool:
    return x.dtype == dtype and x.ndim == 3 and x.strides[2] == x.itemsize


def rope(x: np.ndarray, pos: np.ndarray, out: np.ndarray, n_dims: int, inv_freq: np.ndarray, neox: bool):
    if not (_heads(x) and _heads(out)) or n_dims // 2 > 512 or pos.dtype != np.int32:
        return None
    n, nh, d = x.shape
    inv = np.ascontiguousarray(inv_freq, np.float32)
    return bind("kvg_rope", ptr(x), n, nh, d, x.strides[0] // F4, x.strides[1] // F4, ptr(out), out.strides[0] // F4,
                out.strides[1] // F4, n_dims, ptr(pos), ptr(inv), int(neox), keep=(x, pos, out, inv))


def set_rows(dst: np.ndarray, src: np.ndarray, idx: np.ndarray, transposed: bool, col: int):
    """dst[idx[i]] = src[i] (dst 2-D, float32 or float16: rounded to nearest even, as numpy does;
    transposed: dst[:, idx[i]] = src[i]; col: first column written; q8_0 blocks: whole rows, quantized as
    ggml's quantize_row_q8_0_ref)."""
    if is_q8_0(dst):
        s = src.reshape(src.shape[0], -1) if src.flags.c_contiguous else None
        if (transposed or col or dst.ndim != 2 or s is None or src.dtype != np.float32 or idx.dtype != np.int32
                or s.shape[1] != dst.shape[1] * QK8_0 or dst.strides[1] != Q8_0_BLOCK.itemsize):
            return None
        return bind("kvg_set_rows_q8_0", ptr(dst), dst.strides[0], ptr(s), s.shape[0], s.shape[1], s.strides[0] // F4,
                    ptr(idx), dst.shape[0], keep=(dst, src, idx), indexes=True)
    if dst.dtype not in (np.float32, np.float16) or src.dtype != np.float32 or dst.ndim != 2 or idx.dtype != np.int32:
        return None
    es = dst.itemsize
    s = src.reshape(src.shape[0], -1) if src.flags.c_contiguous else None
    if s is None or s.strides[1] != F4:
        return None
    if transposed:
        if col or s.shape[1] != dst.shape[0]:
            return None
        s0, s1, base, n_dst = dst.strides[1] // es, dst.strides[0] // es, dst, dst.shape[1]
    else:
        if dst.strides[1] != es or col + s.shape[1] > dst.shape[1]:
            return None
        s0, s1, base, n_dst = dst.strides[0] // es, 1, dst[:, col:], dst.shape[0]
    return bind("kvg_set_rows", ptr(base), s0, s1, ptr(s), s.shape[0], s.shape[1], s.strides[0] // F4, ptr(idx),
                n_dst, int(es == 2), keep=(dst, src, idx), indexes=True)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray, scale: float, out: np.ndarray,
              pages: np.ndarray | None = None):
    """out [n, H, dv] = softmax(q k^T * scale + mask) v per head group. q [n, H, d], k [n_kv, Hkv, d], v
    [n_kv, Hkv, dv] (k and v both float32, both float16, or both q8_0 blocks [n_kv, Hkv, d / 32]), mask [n, n_kv]; pages (int32 [n_kv / SEG], the
    KV cache's page blocks) orders the merge of the kernel's segments of SEG cells (None: window order)."""
    if not (_heads(q) and _heads(k, k.dtype) and _heads(out)) or mask.dtype != np.float32 or mask.strides[-1] != F4:
        return None
    if pages is not None and (pages.dtype != np.int32 or pages.shape[0] * SEG != k.shape[0]
                              or not pages.flags.c_contiguous):
        return None
    if is_q8_0(k) or is_q8_0(v):
        return _attention_q8_0(q, k, v, mask, scale, out, pages)
    n, nh, d = q.shape
    n_kv, nhkv, _ = k.shape
    n_kv_v, nhkv_v, dv = v.shape
    es = k.itemsize
    if (k.dtype not in (np.float32, np.float16) or v.dtype != k.dtype or any(st % es for st in v.strides)
            or (n_kv_v, nhkv_v) != (n_kv, nhkv) or dv > 1024 or nh % nhkv):
        return None
    vs0, vs1, vs2 = (st // es for st in v.strides)
    return bind("kvg_attention", ptr(q), n, nh, d, q.strides[0] // F4, q.strides[1] // F4,
                ptr(k), n_kv, nhkv, k.strides[0] // es, k.strides[1] // es,
                ptr(v), dv, vs0, vs1, vs2, ptr(mask), mask.strides[0] // F4, f64_bits(scale),
                ptr(out), out.strides[0] // F4, out.strides[1] // F4, int(es == 2),
                0 if pages is None else ptr(pages), keep=(q, k, v, mask, out, pages))


def _attention_q8_0(q, k, v, mask, scale, out, pages):
    """attention over q8_0 K and V (Q8_0 blocks [n_kv, Hkv, d / 32] and [n_kv, Hkv, dv / 32], each head's blocks
    contiguous): the query quantized to int8 blocks, integer dot products for the scores (kvg_attention)."""
    if not (is_q8_0(k) and is_q8_0(v)) or any(a.strides[2] != Q8_0_BLOCK.itemsize for a in (k, v)):
        return None
    n, nh, d = q.shape
    n_kv, nhkv, gk = k.shape
    n_kv_v, nhkv_v, gv = v.shape
    if (gk * QK8_0 != d or (n_kv_v, nhkv_v) != (n_kv, nhkv) or gk > Q8_MAX_BLOCKS or gv > Q8_MAX_BLOCKS
            or nh % nhkv):
        return None
    return bind("kvg_attention", ptr(q), n, nh, d, q.strides[0] // F4, q.strides[1] // F4,
                ptr(k), n_kv, nhkv, k.strides[0], k.strides[1],
                ptr(v), gv * QK8_0, v.strides[0], v.strides[1], 1, ptr(mask), mask.strides[0] // F4, f64_bits(scale),
                ptr(out), out.strides[0] // F4, out.strides[1] // F4, 2,
                0 if pages is None else ptr(pages), keep=(q, k, v, mask, out, pages))

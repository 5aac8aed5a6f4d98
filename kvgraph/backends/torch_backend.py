"""The torch backend: kvgraph's C kernels where they build, plus torch for what it does better on a CPU
(float matrices through its BLAS) or where there is no C compiler (its own quantized kernels).

With the C kernels (the usual case) quantized matmuls, RMSNorm, RoPE, the gated FFN, KV writes, residual
adds, the embedding lookup and attention run in C, exactly as on the native backend; torch keeps F32 / F16
matrices and any other op. Without them (no compiler, or KVGRAPH_NATIVE=0):

* Q4_0, Q4_1, Q4_K -> torch's CPU int4pack (`_weight_int4pack_mm_for_cpu`, group size 32), which computes
  w = (q - 8) * scale + zero; quant_repack.py maps each GGUF type onto it, and the only loss is the
  bfloat16 rounding of scale and zero (tests/test_torch_backend.py checks it bit for bit through the kernel).
* Q8_0, Q5_0, Q6_K, F16, BF16 matrices -> per-row int8 (`_weight_int8pack_mm`, bf16 activations, bf16
  scales chosen so they are exact); the vocabulary projection is column-equalized before quantizing
  (Int8Mat col_scale), which keeps long-prompt perplexity within 0.2% of the reference.
* F32 tensors and every 1-D tensor stay float32 (F32 data is used straight from the memory-mapped file);
  the token embedding keeps no dense table (get_rows dequantizes the rows of each ubatch's tokens).

Programs are the reference's (one numpy arena laid out by the Plan, torch tensors are zero-copy views of
it); tiny binary ops use numpy (a ufunc call costs less than a torch op). The compile-time fusions are
compiler.FusingCompiler's; a producer whose only readers are bf16 matmuls writes bf16 directly. Measured
choices are in docs/backends.md.
"""
from __future__ import annotations

import contextlib
import functools
import math
import warnings
from typing import Any, Callable, Mapping

import numpy as np

from ..graph.ir import Graph, Tensor
from ..plan.planner import Plan
from . import native, reference
from .compiler import FusingCompiler, PackedWeightsBackend, gated_kind
from .cpus import kernel_threads
from .native.mats import NativeMat, TileArena
from .quant_repack import GROUP, INT4_TYPES, dequant_rows, int4_groups, int8_rows
from .weights import PackedWeight

import torch  # noqa: E402  (this module is imported lazily, only when the torch backend is asked for)

Kernel = Callable[[], None]
TORCH_FORMS = {"f32": torch.float32, "bf16": torch.bfloat16}    # matmul input forms held as torch tensors

# The vocabulary projection (its own tensor, or the tied embedding): its int8 form equalizes columns.
OUTPUT_TENSORS = frozenset({"output.weight", "token_embd.weight"})
# add / mul / cont on tensors with at most this many elements run in numpy (lower per-call overhead).
SMALL = 16384


# ---- weights -------------------------------------------------------------------------------------------------
class Int4Mat:
    """int4pack: packed nibbles [N_pad, K/2] uint8, scales_and_zeros [K/32, N_pad, 2] bf16."""

    input_form = "bf16"

    def __init__(self, data: np.ndarray, type_name: str, shape: tuple[int, int]):
        n, k = shape
        self.n, self.k = n, k
        self.n_pad = -(-n // 16) * 16            # the kernel works on blocks of 16 output channels
        self.packed = torch.empty((self.n_pad, k // 2), dtype=torch.uint8)
        self._sz = torch.zeros((k // GROUP, self.n_pad, 2), dtype=torch.bfloat16)
        self._fused_in: tuple[Int4Mat, int] | None = None
        # Chunks start at multiples of 64 rows and torch packs blocks of 32 / 64 rows independently, so
        # packing chunk by chunk equals packing the whole matrix. Padding rows have scale = zero = 0.
        for r0, q, scale, zero in int4_groups(data, type_name):
            r1 = r0 + q.shape[0]
            self._sz[:, r0:r1, 0] = torch.from_numpy(scale.T)
            self._sz[:, r0:r1, 1] = torch.from_numpy(zero.T)
            if r1 == n and self.n_pad > n:
                q = np.concatenate([q, np.zeros((self.n_pad - n, k), np.uint8)])
            q32 = torch.from_numpy(q.astype(np.int32))
            self.packed[r0: r0 + q.shape[0]] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q32, 1)

    @property
    def sz(self) -> torch.Tensor:
        if self._sz is None:       # fused into a bigger matrix: this one's own copy, only if used alone
            parent, r0 = self._fused_in
            self._sz = parent.sz[:, r0: r0 + self.n_pad].contiguous()
        return self._sz

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + (self.k // GROUP) * self.n_pad * 2 * 2

    @staticmethod
    def can_fuse(mats: list) -> bool:
        # Rows are packed in blocks of up to 64: matrices stack exactly when each is a multiple of 64 rows.
        return all(type(m) is Int4Mat and m.k == mats[0].k and m.n == m.n_pad and m.n % 64 == 0 for m in mats)

    @classmethod
    def fuse(cls, mats: list["Int4Mat"]) -> "Int4Mat":
        """One matrix stacking mats along N; the members keep views of its packed rows (no second copy)."""
        f = cls.__new__(cls)
        f.k, f.n = mats[0].k, sum(m.n for m in mats)
        f.n_pad, f._fused_in = f.n, None
        f.packed = torch.cat([m.packed for m in mats])
        f._sz = torch.cat([m.sz for m in mats], dim=1)
        r0 = 0
        for m in mats:
            m.packed, m._sz, m._fused_in = f.packed[r0: r0 + m.n], None, (f, r0)
            r0 += m.n
        return f

    def dequantize(self) -> np.ndarray:
        """The float32 weight the kernel computes with (for tests): read back through the kernel itself."""
        eye = torch.eye(self.k, dtype=torch.bfloat16)
        return torch._weight_int4pack_mm_for_cpu(eye, self.packed, GROUP, self.sz)[:, : self.n].T.float().numpy()

    def kernel(self, x: torch.Tensor, out: torch.Tensor) -> Kernel:
        mm, packed, sz = torch._weight_int4pack_mm_for_cpu, self.packed, self.sz
        if self.n_pad == self.n:
            return lambda: out.copy_(mm(x, packed, GROUP, sz))
        n = self.n
        return lambda: out.copy_(mm(x, packed, GROUP, sz)[:, :n])

    def kernel_split(self, x: torch.Tensor, outs: list[tuple[int, int, torch.Tensor]]) -> Kernel:
        mm, packed, sz = torch._weight_int4pack_mm_for_cpu, self.packed, self.sz
        return _split_kernel(lambda: mm(x, packed, GROUP, sz), outs)


def _split_kernel(matmul: Callable[[], torch.Tensor], outs: list[tuple[int, int, torch.Tensor]]) -> Kernel:
    """Run a fused matmul once and copy its column ranges into the members' output buffers."""
    if len(outs) == 2:
        (a0, a1, oa), (b0, b1, ob) = outs

        def run2():
            r = matmul()
            oa.copy_(r[:, a0:a1])
            ob.copy_(r[:, b0:b1])
        return run2
    if len(outs) == 3:
        (a0, a1, oa), (b0, b1, ob), (c0, c1, oc) = outs

        def run3():
            r = matmul()
            oa.copy_(r[:, a0:a1])
            ob.copy_(r[:, b0:b1])
            oc.copy_(r[:, c0:c1])
        return run3

    def run():
        r = matmul()
        for c0, c1, o in outs:
            o.copy_(r[:, c0:c1])
    return run


class Int8Mat:
    """Per-output-row symmetric int8 ([N, K] int8, bf16 scales [N]); bf16 activations (the kernel's only
    vectorized path on x86: float32 runs a scalar loop, ~5x slower).

    col_scale (used for the vocabulary projection, whose errors land directly on the logits): W is
    equalized per input column first, W = diag(s) Q diag(c) with c_j = sqrt(max_i |W_ij| / mean), and c
    is folded into the activations (x * c, one multiply per call). It halves the re-quantization error
    of Q8_0 embeddings (relative Frobenius error 1.1% -> 0.7% on SmolLM2, 1.7% -> 1.0% on Gemma3) and
    moves the long-prompt perplexity from +1.14% to +0.21% (SmolLM2) and +0.71% to -0.01% (Gemma3) of
    the float32 reference."""

    input_form = "bf16"

    def __init__(self, data: np.ndarray, type_name: str, shape: tuple[int, int], col_scale: bool = False):
        n, k = shape
        self.n, self.k = n, k
        self.q = torch.empty((n, k), dtype=torch.int8)
        self.scale = torch.empty(n, dtype=torch.bfloat16)
        self.col: torch.Tensor | None = None
        if col_scale:                           # one pass for the column maxima, one to quantize
            cmax = np.zeros(k, np.float32)
            for _, w in dequant_rows(data, type_name, shape):
                np.maximum(cmax, np.abs(w).max(0), out=cmax)
            c = np.sqrt(cmax / cmax.mean()).astype(np.float32)
            c[c == 0] = 1
            self.col = torch.from_numpy(c)
        for r0, w in dequant_rows(data, type_name, shape):
            if self.col is not None:
                w = w / self.col.numpy()
            q, s = int8_rows(w)
            self.q[r0: r0 + q.shape[0]] = torch.from_numpy(q)
            self.scale[r0: r0 + q.shape[0]] = torch.from_numpy(s)    # exact: s is bf16-representable

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes

    @staticmethod
    def can_fuse(mats: list) -> bool:
        return all(type(m) is Int8Mat and m.k == mats[0].k and m.col is None for m in mats)

    @classmethod
    def fuse(cls, mats: list["Int8Mat"]) -> "Int8Mat":
        f = cls.__new__(cls)
        f.k, f.n = mats[0].k, sum(m.n for m in mats)
        f.q = torch.cat([m.q for m in mats])
        f.scale = torch.cat([m.scale for m in mats])
        r0 = 0
        for m in mats:
            m.q, m.scale = f.q[r0: r0 + m.n], f.scale[r0: r0 + m.n]
            r0 += m.n
        return f

    def dequantize(self) -> np.ndarray:
        w = self.q.float() * self.scale.float()[:, None]
        return (w if self.col is None else w * self.col).numpy()

    def kernel(self, x: torch.Tensor, out: torch.Tensor) -> Kernel:
        mm, q, s = torch._weight_int8pack_mm, self.q, self.scale
        if self.col is not None:
            xs, col = torch.empty_like(x), self.col

            def run():
                torch.mul(x, col, out=xs)
                out.copy_(mm(xs, q, s))
            return run
        return lambda: out.copy_(mm(x, q, s))

    def kernel_split(self, x: torch.Tensor, outs: list[tuple[int, int, torch.Tensor]]) -> Kernel:
        mm, q, s = torch._weight_int8pack_mm, self.q, self.scale
        return _split_kernel(lambda: mm(x, q, s), outs)


class DenseMat:
    """float32 [N, K] (F32 files): torch.matmul straight into the output buffer."""

    input_form = "f32"

    def __init__(self, w: np.ndarray):
        self.n, self.k = w.shape
        with warnings.catch_warnings():      # a read-only (memory-mapped) F32 tensor: never written
            warnings.simplefilter("ignore", UserWarning)
            self.t = torch.from_numpy(w)
        self.wt = self.t.t()

    @property
    def nbytes(self) -> int:
        return 0   # shares the dense array, counted there

    def dequantize(self) -> np.ndarray:
        return self.t.numpy()

    def kernel(self, x: torch.Tensor, out: torch.Tensor) -> Kernel:
        wt = self.wt
        return lambda: torch.mm(x, wt, out=out)


def _matrix_form(data: np.ndarray, type_name: str, shape: tuple[int, int], name: str, arena: TileArena | None):
    if arena is not None and shape[1] % GROUP == 0:
        return NativeMat(data, type_name, shape, arena)
    if type_name in INT4_TYPES:
        return Int4Mat(data, type_name, shape)
    return Int8Mat(data, type_name, shape, col_scale=name in OUTPUT_TENSORS)


class TorchWeight(PackedWeight):
    """A PackedWeight whose matmul forms are torch's (or, with native=True, kvgraph's C kernels')."""

    def __init__(self, gguf_file, name: str, arena: TileArena | None = None):
        """arena: where the C kernels' tiles go (None: torch's own matrix forms)."""
        super().__init__(gguf_file, name, functools.partial(_matrix_form, arena=arena), DenseMat)


# ---- elementwise kernels: numpy for small tensors, torch for large ones ----------------------------------
def _t(x: np.ndarray) -> torch.Tensor:
    if not x.flags.writeable:              # read-only weights (memory-mapped F32): never written
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(x)
    return torch.from_numpy(x)


def _k_add(t, out, a, b):
    if out.size <= SMALL:
        return lambda: np.add(a, b, out=out)
    ta, tb, to = _t(a), _t(b), _t(out)
    return lambda: torch.add(ta, tb, out=to)


def _k_mul(t, out, a, b):
    if out.size <= SMALL:
        return lambda: np.multiply(a, b, out=out)
    ta, tb, to = _t(a), _t(b), _t(out)
    return lambda: torch.mul(ta, tb, out=to)


def _k_scale(t, out, x):
    tx, to, s = _t(x), _t(out), t.p["s"]
    return lambda: torch.mul(tx, s, out=to)


def _k_cont(t, out, x):
    if out.size <= SMALL:
        return lambda: np.copyto(out, x)
    tx, to = _t(x), _t(out)
    return lambda: to.copy_(tx)


def _rms_norm_mul(dst: torch.Tensor, x: np.ndarray, w: np.ndarray | None, eps: float) -> Kernel:
    """dst = x / sqrt(mean(x^2) + eps) * w (no w: no weight) in five torch calls, computed as
    x * rsqrt(sum(x^2) + n eps) * (sqrt(n) w) so that no Python scalar is converted per call; dst may be a
    bf16 matmul staging buffer (the cast happens in the last multiply)."""
    n = x.shape[-1]
    tx = _t(x)
    sq = torch.empty(x.shape, dtype=torch.float32)
    ss = torch.empty(x.shape[:-1] + (1,), dtype=torch.float32)
    n_eps = torch.tensor(n * eps, dtype=torch.float32)
    wn = torch.full((n,), math.sqrt(n), dtype=torch.float32)
    if w is not None:
        wn.mul_(_t(np.ascontiguousarray(w, np.float32)))

    def run():
        torch.mul(tx, tx, out=sq)
        torch.sum(sq, -1, True, out=ss)
        ss.add_(n_eps).rsqrt_()
        torch.mul(tx, ss, out=sq)
        torch.mul(sq, wn, out=dst)
    return run


def _k_rms_norm(t, out, x):
    return _rms_norm_mul(_t(out), x, None, t.p["eps"])


def _k_silu(t, out, x):
    tx, to = _t(x), _t(out)
    return lambda: torch._C._nn.silu(tx, out=to)


def _k_gelu(t, out, x):
    tx, to = _t(x), _t(out)
    return lambda: torch._C._nn.gelu(tx, approximate="tanh", out=to)


def _gated(act: Callable, dst: torch.Tensor, gate: np.ndarray, up: np.ndarray,
           tmp: torch.Tensor | None = None) -> Kernel:
    """dst = act(gate) * up in two torch calls through tmp (float32, gate's shape; a compiler shares one
    between its gated nodes); dst may be a bf16 matmul staging buffer, or gate's or up's own buffer."""
    tg, tu = _t(gate), _t(up)
    tmp = torch.empty(tg.shape, dtype=torch.float32) if tmp is None else tmp

    def run():
        act(tg, tmp)
        torch.mul(tmp, tu, out=dst)
    return run


def _silu_out(x, out):
    torch._C._nn.silu(x, out=out)


def _gelu_out(x, out):
    torch._C._nn.gelu(x, approximate="tanh", out=out)


def _k_swiglu(t, out, gate, up):
    return _gated(_silu_out, _t(out), gate, up)


def _k_geglu(t, out, gate, up):
    return _gated(_gelu_out, _t(out), gate, up)


_softmax_out = torch.ops.aten._softmax.out


def _k_softmax(t, out, x, mask=None):
    tx, to = _t(x), _t(out)
    tmp = torch.empty(x.shape, dtype=torch.float32)
    scale = t.p["scale"]
    if mask is None:
        def run():
            torch.mul(tx, scale, out=tmp)
            _softmax_out(tmp, -1, False, out=to)
        return run
    tm = _t(mask)

    def run_masked():
        torch.add(tm, tx, alpha=scale, out=tmp)     # = x * scale + mask, as the reference rounds it
        _softmax_out(tmp, -1, False, out=to)
    return run_masked


def _k_matmul_act(t, out, a, b):
    """matmul of two activations (attention without flash): f32 torch.bmm / matmul into the output."""
    ta, tb, to = _t(a), _t(b), _t(out)
    if t.p["transpose_b"]:
        tb = tb.transpose(-1, -2)
    if ta.dim() == tb.dim() == 3 and ta.shape[0] == tb.shape[0]:
        return lambda: torch.bmm(ta, tb, out=to)
    return lambda: torch.matmul(ta, tb, out=to)


class _Masks:
    """Per-run copies of an attention mask with each row repeated for the query heads of a group, made
    once per run and shared by every layer (prefill only: one token's row broadcasts by itself)."""

    def __init__(self) -> None:
        self.made: dict[tuple[int, int], torch.Tensor] = {}

    def get(self, mask_id: int, mask: np.ndarray, g: int, kernels: list) -> torch.Tensor:
        key = (mask_id, g)
        if key not in self.made:
            n, n_kv = mask.shape
            rep = torch.empty((n, g, n_kv), dtype=torch.float32)
            src = _t(mask).unsqueeze(1).expand(n, g, n_kv)
            kernels.append(lambda: rep.copy_(src))
            self.made[key] = rep.view(n * g, n_kv)
        return self.made[key]


def _k_flash_attn(t, out, q, k, v, mask, mask_rep):
    """softmax(q k^T * scale + mask) v per kv head, as three batched BLAS calls (baddbmm, softmax, bmm).
    Query rows are grouped (token, head-in-group) so a kv head's queries are one [n*g, d] matrix; for one
    token that is a view of q, the mask row broadcasts, and the result is written straight into `out`."""
    n, n_head, d = q.shape
    n_kv, n_head_kv, dv = v.shape
    g = n_head // n_head_kv
    scale = t.p["scale"]
    tq, tk, tv, to = _t(q), _t(k), _t(v), _t(out)
    kt = tk.permute(1, 2, 0)                      # [Hkv, d, n_kv]
    vh = tv.permute(1, 0, 2)                      # [Hkv, n_kv, dv]
    s = torch.empty((n_head_kv, n * g, n_kv), dtype=torch.float32)
    p = torch.empty_like(s)
    if n == 1 and tq.is_contiguous() and to.is_contiguous():
        qg, og, mrow = tq.view(n_head_kv, g, d), to.view(n_head_kv, g, dv), _t(mask).view(1, 1, n_kv)

        def run_one():
            torch.baddbmm(mrow, qg, kt, alpha=scale, out=s)
            _softmax_out(s, -1, False, out=p)
            torch.bmm(p, vh, out=og)
        return run_one
    if mask_rep is None:
        mask_rep = _t(mask).view(1, 1, n_kv)       # one token (strided q or out): its row broadcasts
    qs = torch.empty((n_head_kv, n, g, d), dtype=torch.float32)
    q_src = tq.view(n, n_head_kv, g, d).permute(1, 0, 2, 3)
    qs3 = qs.view(n_head_kv, n * g, d)
    o = torch.empty((n_head_kv, n * g, dv), dtype=torch.float32)
    o_src = o.view(n_head_kv, n, g, dv).permute(1, 0, 2, 3)
    out4 = to.view(n, n_head_kv, g, dv)

    def run():
        qs.copy_(q_src)
        torch.baddbmm(mask_rep, qs3, kt, alpha=scale, out=s)
        _softmax_out(s, -1, False, out=p)
        torch.bmm(p, vh, out=o)
        out4.copy_(o_src)
    return run


# ---- rope ------------------------------------------------------------------------------------------------------
class _RopeTables:
    """cos/sin (and their complex form) per (positions, n_dims, base, freq_scale), computed once per run by
    the first rope kernel that needs them, shared by every layer."""

    def __init__(self) -> None:
        self.tables: dict[tuple, dict[str, Any]] = {}

    def get(self, t: Tensor, pos: np.ndarray) -> tuple[dict[str, Any], Kernel | None]:
        p = t.p
        key = reference.rope_table_key(t)
        if key in self.tables:
            return self.tables[key], None
        half = p["n_dims"] // 2
        inv_freq = torch.from_numpy(reference.rope_inv_freq(p))
        n = pos.shape[0]
        theta = torch.empty((n, 1, half), dtype=torch.float32)
        cos = torch.empty((n, 1, half), dtype=torch.float32)
        sin = torch.empty((n, 1, half), dtype=torch.float32)
        rot = torch.empty((n, 1, half), dtype=torch.complex64)
        ones = torch.ones((n, 1, half), dtype=torch.float32)
        pos_col = _t(pos).view(n, 1, 1)

        def run():
            torch.mul(pos_col, inv_freq, out=theta)
            torch.cos(theta, out=cos)
            torch.sin(theta, out=sin)
            torch.polar(ones, theta, out=rot)
        entry = self.tables[key] = {"cos": cos, "sin": sin, "rot": rot}
        return entry, run


def _complex_view(x: torch.Tensor, n_dims: int) -> torch.Tensor | None:
    part = x[..., :n_dims].unflatten(-1, (n_dims // 2, 2))
    try:
        return torch.view_as_complex(part)
    except RuntimeError:
        return None


def _rope_kernel(t: Tensor, out: np.ndarray, x: np.ndarray, tab: dict[str, Any]) -> Kernel:
    n_dims = t.p["n_dims"]
    half = n_dims // 2
    tx, to = _t(x), _t(out)
    rest = n_dims < x.shape[-1]
    tx_rest, to_rest = tx[..., n_dims:], to[..., n_dims:]
    if not t.p["neox"]:
        # Adjacent pairs (x[2i], x[2i+1]) are a complex number: rotation is one complex multiply.
        xc, oc = _complex_view(tx, n_dims), _complex_view(to, n_dims)
        if xc is not None and oc is not None:
            rot = tab["rot"]

            def run_c():
                torch.mul(xc, rot, out=oc)
                if rest:
                    to_rest.copy_(tx_rest)
            return run_c
        x0, x1, o0, o1 = tx[..., 0:n_dims:2], tx[..., 1:n_dims:2], to[..., 0:n_dims:2], to[..., 1:n_dims:2]
    else:
        x0, x1, o0, o1 = tx[..., :half], tx[..., half:n_dims], to[..., :half], to[..., half:n_dims]
    cos, sin = tab["cos"], tab["sin"]
    tmp = torch.empty(x0.shape, dtype=torch.float32)

    def run():
        torch.mul(x0, cos, out=o0)
        torch.mul(x1, sin, out=tmp)
        o0.sub_(tmp)
        torch.mul(x0, sin, out=o1)
        o1.addcmul_(x1, cos)
        if rest:
            to_rest.copy_(tx_rest)
    return run


KERNELS: dict[str, Callable[..., Kernel]] = {
    "add": _k_add, "mul": _k_mul, "scale": _k_scale, "cont": _k_cont, "rms_norm": _k_rms_norm,
    "silu": _k_silu, "gelu": _k_gelu, "swiglu": _k_swiglu, "geglu": _k_geglu, "softmax": _k_softmax,
}   # every other op (state writes, recurrent ops, row gathers of activations): the numpy reference


# ---- program ---------------------------------------------------------------------------------------------------
class Program(reference.Program):
    """The numpy backend's Program (input buffers are numpy, shared with torch) run in inference mode
    (unless every kernel is a C call, as a cached decode step's usually is: then there is no torch op)."""

    def __init__(self, kernels, inputs, outputs, arena_bytes):
        super().__init__(kernels, inputs, outputs, arena_bytes)
        self.torch_free = all(native.in_c(k) for k in kernels)

    def run(self) -> None:
        if self.torch_free:
            for k in self.kernels:
                k()
            return
        with torch.inference_mode():
            for k in self.kernels:
                k()


class _Compiler(FusingCompiler):
    """Kernels for the torch backend: kvgraph's C kernels where there is one (backend.native), else torch
    ops with out= buffers (numpy for tiny ones)."""

    program_class = Program

    def __init__(self, backend: "TorchBackend", graph: Graph, plan: Plan, weights, states):
        super().__init__(backend, graph, plan, weights, states)
        self.torch_rope, self.masks = _RopeTables(), _Masks()

    def choosers(self):
        return [self._native, self.weight_rows, self.torch_kernel, self.reference_kernel]

    def _native(self, t: Tensor, step: int, out: np.ndarray, srcs: list) -> Kernel | None:
        """kvgraph's C kernel for node t when there is one for its op and buffers, else None."""
        if not self.backend.native:
            return None
        if t.id in self.fused_norm or t.op in ("rms_norm", "swiglu", "geglu", "matmul_glu"):
            if self._dst(t, step).dtype != torch.float32:     # writes a bf16 staging buffer: torch's kernel
                return None
        return self.c_kernel(t, step, out, srcs)

    def torch_kernel(self, t: Tensor, step: int, out: np.ndarray, srcs: list) -> Kernel | None:
        """torch's kernel for node t (torch's quantized matmuls without the C kernels, float matrices,
        attention without the C kernel, elementwise ops), or None: the numpy reference then."""
        if t.id in self.groups:
            return self._group_matmul(self.groups[t.id], step)
        if self.weight_matmul(t):
            mat = srcs[1].matrix()
            return self.weight_product(t.srcs[0], mat, out.reshape(-1, mat.n), step)
        if t.op == "matmul_glu":
            return self.glu_products(t, step, out, srcs)
        if t.id in self.fused_norm:
            r = self.fused_norm[t.id]
            return _rms_norm_mul(self._dst(t, step), self.bufs[r.srcs[0].id], srcs[1].dense.reshape(-1), r.p["eps"])
        if t.op in ("swiglu", "geglu") and srcs[0].shape == srcs[1].shape == out.shape:
            return self.gated(t, step, self.arr(srcs[0]), self.arr(srcs[1]), out)
        if t.op == "rope":
            tab, table_kernel = self.torch_rope.get(t, srcs[1])
            if table_kernel is not None:
                self.kernels.append(table_kernel)
            return _rope_kernel(t, out, srcs[0], tab)
        if t.op == "flash_attn":
            q, k, v, mask = (self.arr(s) for s in srcs[:4])     # one pass over every cell: pages change nothing
            mrep = (self.masks.get(t.srcs[3].id, mask, t.shape[1] // v.shape[1], self.kernels) if t.shape[0] > 1
                    else None)
            return _k_flash_attn(t, out, q, k, v, mask, mrep)
        if t.op == "matmul":
            return _k_matmul_act(t, out, *[self.arr(s) for s in srcs])
        if t.op in KERNELS:
            return KERNELS[t.op](t, out, *[self.arr(s) for s in srcs])
        return None

    def weight_product(self, src: Tensor, mat, out: np.ndarray, step: int) -> Kernel:
        x = self._staged(src, mat.input_form, step)
        return mat.kernel(x, out if mat.input_form == "q8" else _t(out))

    def gated(self, t: Tensor, step: int, gate: np.ndarray, up: np.ndarray, out: np.ndarray) -> Kernel:
        """act(gate) * up for a swiglu / geglu or matmul_glu node, through one activation buffer that the
        program's gated nodes share (not one per layer)."""
        key = (t.id, "act")
        self.last_use[key] = step
        tmp, _ = self.staging.get(key, step, lambda b: isinstance(b, torch.Tensor) and b.dtype == torch.float32
                                  and tuple(b.shape) == gate.shape,
                                  lambda: torch.empty(gate.shape, dtype=torch.float32))
        act = _silu_out if gated_kind(t) == "swiglu" else _gelu_out
        return _gated(act, self._dst(t, step), gate, up, tmp)

    def _dst(self, t: Tensor, step: int) -> torch.Tensor:
        """Where node t's kernel writes: its f32 buffer, or, when every reader of t is a matmul that wants
        t converted (bf16), straight into that staging buffer (t's own buffer is then never used)."""
        readers = self.readers.get(t.id, ())
        forms = {self.weights[r.srcs[1].name].matrix().input_form if self.weight_matmul(r) and r.srcs[0] is t
                 else None for r in readers}
        if t.id in self.outputs_base or forms != {"bf16"}:
            return _t(self.bufs[t.id])
        return self._converted((t.id, "bf16"), _t(self.bufs[t.id]), step, copy=False)

    def _staged(self, src: Tensor, form: str, step: int) -> torch.Tensor:
        """The matmul input in the form its kernel reads ("q8" blocks, "f32" or "bf16" rows [M, K]): the f32
        buffer itself when it can be, else a staged (converted / contiguous) copy shared by every reader."""
        a = self.bufs[src.id]
        k = a.shape[-1]
        if form == "q8":
            return self.q8_input(src, step)
        if form == "f32" and a.flags.c_contiguous:
            return _t(a).view(-1, k)
        return self._converted((src.id, form), _t(a), step).view(-1, k)

    def _converted(self, key: tuple[int, str], x: torch.Tensor, step: int, copy: bool = True) -> torch.Tensor:
        """The staged copy of x in form key[1] (copy=False: the producer writes it directly)."""
        dtype = TORCH_FORMS[key[1]]
        buf, new = self.staging.get(key, step, lambda b: isinstance(b, torch.Tensor) and b.shape == x.shape
                                    and b.dtype == dtype, lambda: torch.empty(x.shape, dtype=dtype))
        if new and copy:
            self.kernels.append(lambda: buf.copy_(x))
        return buf

    def _group_matmul(self, members: list[Tensor], step: int) -> Kernel:
        mats = [self.weights[m.srcs[1].name].matrix() for m in members]
        fused = self.backend.fused(mats)
        x = self._staged(members[0].srcs[0], fused.input_form, step)
        if fused.input_form == "q8":
            return fused.kernel_split(x, [self.bufs[m.id].reshape(-1, mat.n) for m, mat in zip(members, mats)])
        outs, c0 = [], 0
        for m, mat in zip(members, mats):
            outs.append((c0, c0 + mat.n, _t(self.bufs[m.id]).view(-1, mat.n)))
            c0 += mat.n
        return fused.kernel_split(x, outs)


class TorchBackend(PackedWeightsBackend):
    name = "torch"

    def __init__(self, threads: int | None = None, native_kernels: bool | None = None):
        self.n_threads = kernel_threads(threads)
        torch.set_num_threads(self.n_threads)
        # kvgraph's own C kernels (see backends/native) unless asked not to or they cannot be built; without
        # them matmuls use torch's int4pack / int8 kernels and every other op torch or numpy.
        self.native = native_kernels is not False and native.library() is not None
        self.arena = TileArena() if self.native else None
        if self.native:
            native.set_threads(self.n_threads)
        # The C attention kernel reads the row-major (flash) V cache, in float16 or q8_0 too: the fast defaults when it
        # exists. torch's own attention ops take float32 only.
        self.flash_attn_default = self.native
        self.cache_types = ("f16", "f32", "q8_0") if self.native else ("f32",)

    def describe(self) -> str:
        kernels = native.describe() if self.native else "torch's int4pack / int8 kernels"
        return f"torch {torch.__version__} + {kernels}"

    # ---- weights ----------------------------------------------------------------------------------------
    def load_weight(self, gguf_file, name: str) -> TorchWeight:
        return TorchWeight(gguf_file, name, self.arena)

    @contextlib.contextmanager
    def threads(self, n: int | None):
        """torch's threads and the C kernels' set to n (at most the usable CPUs) for the duration."""
        old, want = torch.get_num_threads(), kernel_threads(n) if n else self.n_threads
        torch.set_num_threads(want)
        if self.native:
            native.set_threads(want)
        try:
            yield
        finally:
            torch.set_num_threads(old)
            if self.native:
                native.set_threads(self.n_threads)

    def to_numpy(self, x) -> np.ndarray:
        if isinstance(x, torch.Tensor):
            return x.detach().to(torch.float32).numpy().copy()
        return np.array(x, dtype=np.float32, copy=True)

    def alloc_state(self, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
        return np.zeros(shape, dtype)

    # ---- compile ----------------------------------------------------------------------------------------
    def compile(self, graph: Graph, plan: Plan, weights: Mapping[str, TorchWeight],
                states: Mapping[str, np.ndarray], arena: np.ndarray | None = None) -> Program:
        return _Compiler(self, graph, plan, weights, states).compile(arena)

"""The native backend: kvgraph's C kernels (backends/native) over numpy buffers, with no torch at all.

Quantized matmuls (int8 activations against 4-/5-/8-bit weights repacked once at load), RMSNorm, RoPE,
the gated FFN activations, KV writes, residual adds and multiplies, the embedding lookup and attention
(every ubatch size) run in C; any other op uses the numpy reference kernels. It needs a C compiler the
first time (the kernels build in about a second and are cached). Without torch in the process its
resident memory is little more than the file-sized weights, the KV cache and Python: what
`--backend native` is for.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Mapping

import numpy as np

from ..errors import InvalidArgumentError
from ..graph.ir import Graph, Tensor
from ..plan.planner import Plan
from . import native, reference
from .cpus import kernel_threads
from .compiler import FusingCompiler, Kernel, PackedWeightsBackend
from .native import PACK_TYPES, tile_cache
from .native.mats import REQUANTIZED, ExpertScratch, NativeMat, TileArena, experts_kernel
from .native.tile_cache import TileCache
from .numpy_backend import NumpyBackend
from .quant_repack import GROUP, dequant_rows
from .weights import PackedWeight


class DenseMat:
    """A float matrix [N, K] as the file stores it: float32 (F32 files, or a width the block formats cannot
    take), float16 (F16) or bfloat16 (BF16, held as its uint16 bits), read in place by kvg_matmul_f32, whose
    rows do not depend on the ubatch (numpy's matmul, on float32 values, where the buffers' layout is not
    one it takes)."""

    input_form = "f32"
    exact = True                   # the file's own values
    WEIGHT_TYPES = {np.dtype(np.float32): 0, np.dtype(np.float16): 1, np.dtype(np.uint16): 2}

    def __init__(self, w: np.ndarray):
        self.n, self.k = w.shape
        self.w = w
        self._f32: np.ndarray | None = None

    @classmethod
    def of_file(cls, data: np.ndarray, type_name: str) -> "DenseMat":
        """An F32 / F16 / BF16 matrix from the file's data (the memory-mapped bytes themselves)."""
        return cls(data.view(np.uint16) if type_name == "BF16" else data)

    @property
    def nbytes(self) -> int:
        return self.w.nbytes

    def float32(self) -> np.ndarray:
        if self.w.dtype == np.float32:
            return self.w
        if self._f32 is None:          # bfloat16 bits are a float32's top half
            bf16 = self.w.dtype == np.uint16
            self._f32 = (self.w.astype(np.uint32) << 16).view(np.float32) if bf16 else self.w.astype(np.float32)
        return self._f32

    def kernel(self, x: np.ndarray, out: np.ndarray) -> Kernel:
        w = self.w
        if all(a.ndim == 2 and a.strides[1] == a.itemsize for a in (w, x, out)) and x.dtype == out.dtype == np.float32:
            return native.bind("kvg_matmul_f32", native.ptr(w), self.n, self.k, native.ptr(x), x.shape[0],
                               native.ptr(out), w.strides[0] // w.itemsize, x.strides[0] // 4, out.strides[0] // 4,
                               self.WEIGHT_TYPES[w.dtype], keep=(w, x, out))
        wt = self.float32().T
        return lambda: np.matmul(x, wt, out=out)


class NativeWeight(PackedWeight):
    STACKS_EXPERTS = True          # kvg_moe_tiles reads a mixture's experts from their tiles

    def __init__(self, gguf_file, name: str, backend: "NativeBackend"):
        super().__init__(gguf_file, name, backend.matrix_form, DenseMat)


class _Compiler(FusingCompiler):
    def choosers(self):
        return [self.experts, self.c_kernel, self.packed_matmul, self.weight_rows, self.norm_times_weight,
                self.reference_kernel]

    def _input(self, src: Tensor, mat, step: int):
        if mat.input_form == "q8":
            return self.q8_input(src, step)
        a = self.bufs[src.id]
        return a.reshape(-1, a.shape[-1])

    def weight_product(self, src: Tensor, mat, out: np.ndarray, step: int) -> Kernel:
        kernel = mat.kernel(self._input(src, mat, step), out)
        if not native.in_c(kernel):
            self.backend.limit_blas()
        return kernel

    def reference_kernel(self, t: Tensor, step: int, out: np.ndarray, srcs: list) -> Kernel:
        if t.op in reference.BLAS_OPS:
            self.backend.limit_blas()
        return super().reference_kernel(t, step, out, srcs)

    def packed_matmul(self, t: Tensor, step: int, out: np.ndarray, srcs: list) -> Kernel | None:
        """A matmul against a repacked weight, alone or as the last member of a stacked group, or a
        matmul_glu the fused kernel does not take."""
        if t.id in self.groups:
            members = self.groups[t.id]
            mats = [self.weights[m.srcs[1].name].matrix() for m in members]
            fused = self.backend.fused(mats)
            x = self._input(members[0].srcs[0], fused, step)
            return fused.kernel_split(x, [self.bufs[m.id].reshape(-1, mat.n) for m, mat in zip(members, mats)])
        if self.weight_matmul(t):
            mat = srcs[1].matrix()
            return self.weight_product(t.srcs[0], mat, out.reshape(-1, mat.n), step)
        if t.op == "matmul_glu":
            return self.glu_products(t, step, out, srcs)
        return None

    def experts(self, t: Tensor, step: int, out: np.ndarray, srcs: list) -> Kernel | None:
        """A mixture of experts over the experts' tiles (kvg_moe_tiles), where the file's experts have them:
        float32 copies of the experts are never made."""
        if t.op != "moe_ffn":
            return None
        x, router, up, gate, down = srcs
        mats = [w.mat for w in (gate, up, down)]
        if not all(isinstance(m, NativeMat) for m in mats):
            return None
        x = self.bufs[t.srcs[0].id]
        dims = (x.shape[0], x.shape[1], mats[0].n // router.shape[0], router.shape[0], t.p["n_used"])
        key, x_key = (t.id, "experts"), (t.srcs[0].id, "q8")
        self.last_use[key] = step
        self.last_use[x_key] = max(self.last_use.get(x_key, step), step)     # x's Q8 form: read here too
        scratch, _ = self.staging.get(key, step, lambda b: isinstance(b, ExpertScratch) and b.dims == dims,
                                      lambda: ExpertScratch(*dims))
        return experts_kernel(x, lambda: self.q8_input(t.srcs[0], step), router.array(), mats, t.p["n_used"],
                              t.p["norm_weights"], out, scratch)

    def norm_times_weight(self, t: Tensor, step: int, out: np.ndarray, srcs: list) -> Kernel | None:
        """A fused rms_norm x weight the C norm does not take: numpy's, into a scratch row (numpy's norm is
        not in-place safe, and out may be x's buffer)."""
        if t.id not in self.fused_norm:
            return None
        r = self.fused_norm[t.id]
        tmp, w = np.empty(out.shape, np.float32), srcs[1].dense
        norm = reference.KERNELS["rms_norm"](r, tmp, self.bufs[r.srcs[0].id])
        return lambda: (norm(), np.multiply(tmp, w, out=out))


class NativeBackend(PackedWeightsBackend, NumpyBackend):
    name = "native"
    native = True                  # the compilers' switch for kvgraph's C kernels (see TorchBackend.native)
    flash_attn_default = True      # the C attention kernel reads the row-major (flash) V cache
    cache_types = ("f16", "f32", "q8_0")   # float16 K/V: half the bytes per token of context, as llama.cpp keeps
                                           # them; q8_0: ggml's int8 blocks, 34 bytes per 32 values

    def __init__(self, threads: int | None = None):
        lib = native.library()
        if lib is None:
            raise InvalidArgumentError(f"the native backend needs its C kernels, and {native.why_not()}; use "
                                       "--backend torch or numpy.")
        self.arena = TileArena()
        self.tile_cache: TileCache | None = None
        self.requantized: dict[str, int] = {}
        self.n_threads = kernel_threads(threads)
        native.set_threads(self.n_threads)
        self._blas_limited = False

    def limit_blas(self) -> None:
        """numpy's BLAS down to one thread, the first time a program here calls it: its worker threads keep
        spinning after each call and, beside the C kernels' threads, steal the cores (a 128-token prompt took 2x
        longer). Models whose every hot op is C never call it, and never pay threadpoolctl (~0.4 MB)."""
        if not self._blas_limited:
            from threadpoolctl import threadpool_limits

            threadpool_limits(limits=1, user_api="blas")
            self._blas_limited = True

    def describe(self) -> str:
        return f"native: {native.describe()}"

    def start_load(self, gguf_file) -> None:
        """A model file's weights are about to be loaded: its repacked-weights cache entry, if kept."""
        self.tile_cache = TileCache(gguf_file) if tile_cache.enabled() else None
        self.requantized = {}      # GGUF type -> matrices re-quantized to Q8 in this load

    def load_weight(self, gguf_file, name: str) -> NativeWeight:
        return NativeWeight(gguf_file, name, self)

    def matrix_form(self, data: np.ndarray, type_name: str, shape: tuple[int, int], name: str):
        """A weight matrix's kernel form: F16 / BF16 as stored (DenseMat), tiles (from the cache entry, or
        packed into it or into memory), or a float32 DenseMat for a width the tile formats cannot take."""
        if type_name in ("F16", "BF16"):
            return DenseMat.of_file(data, type_name)
        if shape[1] % GROUP:
            return DenseMat(np.concatenate([w for _, w in dequant_rows(data, type_name, shape)]))
        cache = self.tile_cache
        cached = cache.lookup(name) if cache is not None else None
        if cached is not None and (cached.n, cached.k) == tuple(shape):
            mat = NativeMat.from_tiles(cached)
        else:
            arena = cache.arena if cache is not None and cache.arena is not None else self.arena
            mat = NativeMat(data, type_name, shape, arena)
            if cache is not None:
                cache.record(name, mat)
        if not mat.exact:
            self.requantized[type_name] = self.requantized.get(type_name, 0) + 1
        return mat

    def finish_load(self) -> None:
        super().finish_load()
        if self.tile_cache is not None:
            self.tile_cache.finish()
        if self.requantized:
            what = ", ".join(f"{n} {t}" for t, n in sorted(self.requantized.items()))
            why = ("the C kernels have no tiles for that type" if any(t not in PACK_TYPES for t in self.requantized)
                   else "a scale that float16 cannot hold")
            print(f"kvgraph: {what} matri{'x' if sum(self.requantized.values()) == 1 else 'ces'} "
                  f"{REQUANTIZED} ({why})", file=sys.stderr)

    def weights_origin(self) -> str:
        """Where the last load's tiles came from: mapped from a cache entry, or packed (and kept, or why not)."""
        cache = self.tile_cache
        if cache is None:
            return "repacked at load (weight cache off)"
        return {"hit": f"mapped from {cache.path}", "written": f"repacked at load, kept in {cache.path}",
                "small": "repacked at load (too small to keep)"}.get(
                    cache.state, f"repacked at load ({cache.state})")

    @contextlib.contextmanager
    def threads(self, n: int | None):
        """The C kernels' threads set to n (at most the usable CPUs) for the duration."""
        native.set_threads(kernel_threads(n) if n else self.n_threads)
        try:
            yield
        finally:
            native.set_threads(self.n_threads)

    def compile(self, graph: Graph, plan: Plan, weights: Mapping[str, NativeWeight],
                states: Mapping[str, np.ndarray], arena: np.ndarray | None = None) -> reference.Program:
        return _Compiler(self, graph, plan, weights, states).compile(arena)

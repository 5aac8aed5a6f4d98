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
from typing import Mapping

import numpy as np

from ..errors import InvalidArgumentError
from ..graph.ir import Graph, Tensor
from ..plan.planner import Plan
from . import native
from . import numpy_backend as npb
from .compiler import FusingCompiler, Kernel, PackedWeightsBackend
from .native.mats import NativeMat
from .quant_repack import GROUP, dequant_rows
from .weights import PackedWeight


class DenseMat:
    """A float32 matrix [N, K] (F32 files, or a width the block formats cannot take): numpy's matmul."""

    act_dtype = np.float32

    def __init__(self, w: np.ndarray):
        self.n, self.k = w.shape
        self.w = w

    @property
    def nbytes(self) -> int:
        return 0 if not self.w.flags.owndata else self.w.nbytes

    def kernel(self, x: np.ndarray, out: np.ndarray) -> Kernel:
        wt = self.w.T
        return lambda: np.matmul(x, wt, out=out)


def _matrix_form(data: np.ndarray, type_name: str, shape: tuple[int, int], name: str):
    if shape[1] % GROUP == 0:
        return NativeMat(data, type_name, shape)
    return DenseMat(np.concatenate([w for _, w in dequant_rows(data, type_name, shape)]))


class NativeWeight(PackedWeight):
    def __init__(self, gguf_file, name: str):
        super().__init__(gguf_file, name, _matrix_form, DenseMat)


class _Compiler(FusingCompiler):
    def __init__(self, backend, graph: Graph, plan: Plan, weights, states):
        super().__init__(backend, graph, plan, weights, states)
        self.rope = npb._RopeTables()

    def _input(self, src: Tensor, mat, step: int):
        if mat.act_dtype == "q8":
            return self.q8_input(src, step)
        a = self.bufs[src.id]
        return a.reshape(-1, a.shape[-1])

    def emit(self, t: Tensor, step: int) -> None:
        out = self.bufs[t.id]
        srcs = [self.bufs[s.id] for s in t.srcs]
        k = self.c_kernel(t, out, srcs)
        if k is not None:
            self.kernels.append(k)
        elif t.id in self.groups:
            members = self.groups[t.id]
            mats = [self.weights[m.srcs[1].name].matrix() for m in members]
            fused = self.backend.fused(mats)
            x = self._input(members[0].srcs[0], fused, step)
            self.kernels.append(fused.kernel_split(x, [self.bufs[m.id].reshape(-1, mat.n)
                                                       for m, mat in zip(members, mats)]))
        elif self.weight_matmul(t):
            mat = srcs[1].matrix()
            self.kernels.append(mat.kernel(self._input(t.srcs[0], mat, step), out.reshape(-1, mat.n)))
        elif t.op == "get_rows" and t.srcs[0].op == "weight":
            self.kernels.append(srcs[0].rows().kernel(srcs[1], out))
        elif t.id in self.fused_norm:      # a layout the C norm does not take: numpy's, into a scratch row
            r = self.fused_norm[t.id]      # (numpy's norm is not in-place safe, and out may be x's buffer)
            tmp, w = np.empty(out.shape, np.float32), srcs[1].dense
            norm = npb.KERNELS["rms_norm"](r, tmp, self.bufs[r.srcs[0].id])
            self.kernels.append(lambda: (norm(), np.multiply(tmp, w, out=out)))
        elif t.op == "rope":
            arrays = [self.arr(s) for s in srcs]
            cos, sin, table_kernel = self.rope.get(t, arrays[1])
            if table_kernel is not None:
                self.kernels.append(table_kernel)
            self.kernels.append(npb._rope_kernel(t, out, arrays[0], cos, sin))
        else:
            self.kernels.append(npb.KERNELS[t.op](t, out, *[self.arr(s) for s in srcs]))


class NativeBackend(PackedWeightsBackend, npb.NumpyBackend):
    name = "native"
    native = True                  # the compilers' switch for kvgraph's C kernels (see TorchBackend.native)
    flash_attn_default = True      # the C attention kernel reads the row-major (flash) V cache
    cache_types = ("f16", "f32")   # float16 K/V: half the bytes per token of context, as llama.cpp keeps them

    def __init__(self, threads: int | None = None):
        from ..bench import physical_cores

        lib = native.library()
        if lib is None:
            raise InvalidArgumentError(f"the native backend needs its C kernels, and {native.why_not()}; use "
                                       "--backend torch or numpy.")
        super().__init__(threads)
        self.n_threads = threads or physical_cores()
        native.set_threads(self.n_threads)
        # numpy's BLAS keeps its worker threads spinning after each call; beside the OpenMP kernels they
        # steal the cores (a 128-token prompt took 2x longer). The hot ops are all C here, so BLAS gets one.
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=1, user_api="blas")

    def describe(self) -> str:
        return f"native: {native.describe()}"

    def load_weight(self, gguf_file, name: str) -> NativeWeight:
        return NativeWeight(gguf_file, name)

    @contextlib.contextmanager
    def threads(self, n: int | None):
        """The C kernels' (OpenMP) threads set to n for the duration."""
        native.set_threads(n or self.n_threads)
        try:
            yield
        finally:
            native.set_threads(self.n_threads)

    def compile(self, graph: Graph, plan: Plan, weights: Mapping[str, NativeWeight],
                states: Mapping[str, np.ndarray]) -> npb.Program:
        return _Compiler(self, graph, plan, weights, states).compile()

"""Weights and activations in the native kernels' formats (see kernels.c), and the matmul kernels over them.

* Q4_0 / Q4_1 / Q4_K matrices -> Q4 rows, exact: w = q d + m per block of 32 (int4_blocks gives d and m
  exactly as gguf.quants computes them).
  Scales are stored as float16 when that is exact (Q4_0 / Q4_1 always; 20 bytes per 32 weights, as in
  the file) and as float32 otherwise (Q4_K's products d * sc; 24 bytes).
* Q5_0 / Q5_1 -> Q5 rows, exact: Q4's layout plus a plane of fifth bits (24 bytes per 32 weights).
* Q8_0 -> Q8 rows, exact (34 bytes per 32 weights). Every other type (Q6_K, Q5_K, F16, ...) is dequantized
  and re-quantized to Q8 per block of 32 (symmetric, as Q8_0 is made): error at most half a step of
  max|w| / 127 per block, as llama.cpp's own Q8_0 files have.
* Activations are quantized per row and block of 32 to int8 before each matmul (Q8Act), once per source
  tensor however many matmuls read it -- exactly what ggml does on the CPU (its Q8_0 / Q8_1 activations).
"""
from __future__ import annotations

import numpy as np

from ..quant_repack import CHUNK_ROWS, INT4_TYPES, INT5_TYPES, dequant_rows, int4_blocks, release_pages
from . import QK, bind, f16_exact, pack_q4, pack_q5, pack_q8, ptr, quantize_blocks_q8


class Q8Act:
    """An activation [M, K] quantized for the native matmuls: q int8 [M, K], d and s (= d sum q) [M, K/32]."""

    def __init__(self, m: int, k: int):
        self.m, self.k = m, k
        self.q = np.empty((m, k), np.int8)
        self.d = np.empty((m, k // QK), np.float32)
        self.s = np.empty((m, k // QK), np.float32)

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.d.nbytes + self.s.nbytes

    def quantize_kernel(self, x: np.ndarray):
        """Kernel quantizing x (float32 [M, K], rows may be strided) into this buffer."""
        if x.shape != (self.m, self.k) or x.strides[1] != 4:
            raise ValueError(f"quantize: x {x.shape} strides {x.strides} for a [{self.m}, {self.k}] buffer")
        return bind("kvg_quantize_q8", ptr(x), self.m, self.k, x.strides[0] // 4, ptr(self.q), ptr(self.d),
                    ptr(self.s), keep=(x, self))


def _q8_0_blocks(raw: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    blocks = raw.reshape(raw.shape[0], k // QK, 34)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
    return np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(raw.shape[0], k), d


class NativeMat:
    """One weight matrix [N, K] in Q4, Q5 or Q8 rows. act_dtype "q8": its input is staged as a Q8Act."""

    act_dtype = "q8"

    def __init__(self, data: np.ndarray, type_name: str, shape: tuple[int, int]):
        n, k = shape
        self.n, self.k = n, k
        g = k // QK
        if type_name in INT4_TYPES:
            self._pack_q4(data, type_name, half=True) or self._pack_q4(data, type_name, half=False)
            return
        if type_name in INT5_TYPES and self._pack_q5(data, type_name):
            return
        self.fmt = "q8"
        self.rows = np.empty((n, k + 2 * g), np.uint8)
        if type_name == "Q8_0":
            for r0 in range(0, n, CHUNK_ROWS):
                part = data[r0: r0 + CHUNK_ROWS]
                self.rows[r0: r0 + part.shape[0]] = pack_q8(*_q8_0_blocks(np.ascontiguousarray(part), k))
                release_pages(part)
        else:
            for r0, w in dequant_rows(data, type_name, shape):
                self.rows[r0: r0 + w.shape[0]] = pack_q8(*quantize_blocks_q8(w))

    def _pack_q4(self, data: np.ndarray, type_name: str, half: bool) -> bool:
        """Q4 rows with float16 scales (False if some scale is not exactly a float16) or float32 ones."""
        self.fmt = "q4h" if half else "q4"
        self.rows = np.empty((self.n, self.k // 2 + self.k // QK * (4 if half else 8)), np.uint8)
        for r0, q, d, m in int4_blocks(data, type_name):
            if half and not (f16_exact(d) and f16_exact(m)):
                return False
            self.rows[r0: r0 + q.shape[0]] = pack_q4(q, d, m, half)
        return True

    def _pack_q5(self, data: np.ndarray, type_name: str) -> bool:
        """Q5 rows (float16 scales; False if one is not exactly a float16: then Q8 it is)."""
        self.fmt = "q5h"
        self.rows = np.empty((self.n, self.k // 2 + self.k // 8 + self.k // QK * 4), np.uint8)
        for r0, q, d, m in int4_blocks(data, type_name):
            if not (f16_exact(d) and f16_exact(m)):
                return False
            self.rows[r0: r0 + q.shape[0]] = pack_q5(q, d, m)
        return True

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes

    @staticmethod
    def can_fuse(mats: list) -> bool:
        return all(type(m) is NativeMat and m.k == mats[0].k and m.fmt == mats[0].fmt for m in mats)

    @classmethod
    def fuse(cls, mats: list["NativeMat"]) -> "NativeMat":
        """One matrix stacking mats' rows; the members keep views of it (no second copy)."""
        f = cls.__new__(cls)
        f.n, f.k, f.fmt = sum(m.n for m in mats), mats[0].k, mats[0].fmt
        f.rows = np.concatenate([m.rows for m in mats])
        r0 = 0
        for m in mats:
            m.rows = f.rows[r0: r0 + m.n]
            r0 += m.n
        return f

    def dequantize(self) -> np.ndarray:
        """The float32 weight the kernel computes with (for tests)."""
        n, k, g = self.n, self.k, self.k // QK
        if self.fmt == "q8":
            q = self.rows[:, :k].view(np.int8).astype(np.float32)
            d = self.rows[:, k:].copy().view(np.float16).astype(np.float32)
            return (q.reshape(n, g, QK) * d[..., None]).reshape(n, k)
        nib = self.rows[:, : k // 2]
        hi = 0
        if self.fmt == "q5h":
            bits = self.rows[:, k // 2: k // 2 + k // 8].reshape(n, g, 4)
            hi = np.unpackbits(bits, axis=2, bitorder="little").astype(np.float32) * 16
        q = np.empty((n, g, QK), np.float32)
        pairs = nib[:, : (g // 2) * 32].reshape(n, g // 2, 32)
        q[:, 0: g - g % 2: 2] = pairs & 15
        q[:, 1: g - g % 2: 2] = pairs >> 4
        if g % 2:
            last = nib[:, (g // 2) * 32:]
            q[:, -1, :16], q[:, -1, 16:] = last & 15, last >> 4
        q = q + hi
        so = k // 2 + (k // 8 if self.fmt == "q5h" else 0)
        dm = self.rows[:, so:].copy().view(np.float32 if self.fmt == "q4" else np.float16).astype(np.float32)
        d, m = dm[:, :g], dm[:, g:]
        return (q * d[..., None] + m[..., None]).reshape(n, k)

    def _bind(self, x: Q8Act, outs: list[np.ndarray]):
        ends = np.cumsum([o.shape[-1] for o in outs]).astype(np.int64)
        if ends[-1] != self.n or any(o.shape[0] != x.m or not o.flags.c_contiguous for o in outs):
            raise ValueError(f"matmul outputs {[o.shape for o in outs]} for [{x.m}, {self.n}]")
        outp = np.array([ptr(o) for o in outs], np.int64)
        return bind(f"kvg_matmul_{self.fmt}", ptr(self.rows), self.n, self.k, ptr(x.q), ptr(x.d), ptr(x.s), x.m,
                    len(outs), ptr(ends), ptr(outp), self.rows.strides[0], keep=(self.rows, x, outs, ends, outp))

    def kernel(self, x: Q8Act, out: np.ndarray):
        return self._bind(x, [out])

    def kernel_split(self, x: Q8Act, outs: list[np.ndarray]):
        """One run of the stacked matrix writing each member's columns into its own output [M, n_i]."""
        return self._bind(x, outs)


def as_rows(a: np.ndarray) -> np.ndarray:
    """A matmul input [..., K] as the [M, K] matrix with unit-stride rows the kernels read."""
    a2 = a.reshape(-1, a.shape[-1]) if a.flags.c_contiguous else a
    if a2.ndim != 2 or a2.strides[1] != 4:
        raise ValueError(f"native matmul input of shape {a.shape} is not a row-strided matrix")
    return a2

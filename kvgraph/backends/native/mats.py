"""Weights and activations in the native kernels' formats (see kernels.c), and the matmul kernels over them.

* Packing is C (kvg_pack_tiles) from the file's blocks; the numpy packers of __init__.py are its reference.
* Q4_0 / Q4_1 matrices -> Q4 tiles, exact: w = q d + m per block of 32, scales as float16 (20 bytes per 32
  weights, as in the file; float32, from int4_blocks, in the unlikely case one is not exactly a float16, such
  as -8 d overflowing).
* Q5_0 / Q5_1 -> Q5 tiles, exact: Q4's layout plus a plane of fifth bits (24 bytes per 32 weights).
* Q4_K / Q5_K / Q6_K -> their own tile formats, exact, the file's numbers (6-bit scales and mins, float16
  super-block scales): 4.625 / 5.625 / 6.5625 bits per weight (the file: 4.5 / 5.5 / 6.5625).
* Q8_0 -> Q8 tiles, exact (34 bytes per 32 weights). F16 / BF16 are read as stored (native_backend's
  DenseMat). Every other type (Q2_K, Q3_K, IQ*, ...) is dequantized
  and re-quantized to Q8 per block of 32 (symmetric, as Q8_0 is made): error at most half a step of
  max|w| / 127 per block, as llama.cpp's own Q8_0 files have.
* Activations are quantized per row and block of 32 to int8 before each matmul (Q8Act), once per source
  tensor however many matmuls read it -- exactly what ggml does on the CPU (its Q8_0 / Q8_1 activations).
"""
from __future__ import annotations

import mmap

import numpy as np

from ..quant_repack import CHUNK_ROWS, INT4_TYPES, dequant_rows, int4_blocks, release_pages
from . import (FORMATS, GATED_KINDS, PACK_TYPES, QK, TR, bind, dequantize_tiles, pack_q4, pack_q8, pack_tiles_c,
               ptr, quantize_blocks_q8, tile_bytes)


def runs_as(type_name: str) -> str:
    """What the C kernels compute a matrix of this GGUF type with (for `kvgraph info` and the load log)."""
    if type_name in ("F32", "F16", "BF16"):
        return {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[type_name] + ", as stored"
    if type_name in PACK_TYPES:
        return "tiles of the file's own values"
    return REQUANTIZED


REQUANTIZED = "re-quantized to 8 bits per weight (Q8 tiles, not the file's exact values)"


class Q8Act:
    """An activation [M, K] quantized for the native matmuls: q int8 [M, K]; per block of 32, d and s = d * sum q
    float32 [M, K/32]; h int32 [M, K/16], the sums of q over each half block."""

    def __init__(self, m: int, k: int):
        self.m, self.k = m, k
        self.q = np.empty((m, k), np.int8)
        self.d = np.empty((m, k // QK), np.float32)
        self.s = np.empty((m, k // QK), np.float32)
        self.h = np.empty((m, 2 * (k // QK)), np.int32)

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.d.nbytes + self.s.nbytes + self.h.nbytes

    def quantize_kernel(self, x: np.ndarray):
        """Kernel quantizing x (float32 [M, K], rows may be strided) into this buffer."""
        if x.shape != (self.m, self.k) or x.strides[1] != 4:
            raise ValueError(f"quantize: x {x.shape} strides {x.strides} for a [{self.m}, {self.k}] buffer")
        return bind("kvg_quantize_q8", ptr(x), self.m, self.k, x.strides[0] // 4, ptr(self.q), ptr(self.d),
                    ptr(self.s), ptr(self.h), keep=(x, self))


HUGE_PAGES = True     # advise tile blocks into transparent huge pages (where the system offers them)


class TileArena:
    """Tiles of matrices loaded one after another, laid end to end in large blocks. A graph stacks sibling
    matmuls (q/k/v, gate/up), which a model loads consecutively, so their tiles already form the stacked
    matrix and NativeMat.fuse takes a view instead of copying ~40 MB at the first compile. A block is an
    anonymous mapping in transparent huge pages where the system offers them (fewer TLB misses streaming the
    weights, as numpy asks for its large arrays); block space no tile uses is handed back (`release_unused`,
    called on moving to a new block and once the load is done), so a huge page it shares with the last
    tiles costs only what they use."""

    BLOCK = 64 << 20

    def __init__(self) -> None:
        self.block: np.ndarray | None = None
        self._map: mmap.mmap | None = None
        self.used = 0

    def take(self, rows: int, row_bytes: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows x row_bytes tiles, the block they lie in)."""
        n = rows * row_bytes
        if self.block is None or self.used + n > self.block.size:
            self.release_unused()
            self.block, self.used = self._new_block(max(self.BLOCK, n)), 0
        out = self.block[self.used: self.used + n].reshape(rows, row_bytes)
        self.used += n
        return out, self.block

    def _new_block(self, size: int) -> np.ndarray:
        if not hasattr(mmap, "MAP_PRIVATE"):             # no POSIX mmap flags (Windows): a plain array
            self._map = None
            return np.empty(size, np.uint8)
        self._map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if HUGE_PAGES and hasattr(mmap, "MADV_HUGEPAGE"):
            self._map.madvise(mmap.MADV_HUGEPAGE)
        return np.frombuffer(self._map, np.uint8)

    def release_unused(self) -> None:
        """Drop the current block's pages past its tiles (touched again, they come back as zeros)."""
        if self._map is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        lo = -(-self.used // mmap.PAGESIZE) * mmap.PAGESIZE
        if lo < len(self._map):
            self._map.madvise(mmap.MADV_DONTNEED, lo, len(self._map) - lo)


def _end_to_end(mats: list["NativeMat"]) -> bool:
    """Whether mats' tiles lie end to end, in order, in one arena block."""
    block = mats[0].block
    if block is None or any(m.block is not block for m in mats):
        return False
    end = mats[0].tiles.ctypes.data
    for m in mats:
        if m.tiles.ctypes.data != end:
            return False
        end += m.tiles.nbytes
    return True


class NativeMat:
    """One weight matrix [N, K] in tiles of 16 rows (kernels.c: Q4, Q5, Q8 or a K-quant's own format). Its
    input is staged as a Q8Act (input_form "q8")."""

    input_form = "q8"

    def __init__(self, data: np.ndarray, type_name: str, shape: tuple[int, int], arena: TileArena | None = None):
        n, k = shape
        self.n, self.k, self._arena, self.block = n, k, arena, None
        self.exact = True             # the tiles hold the file's values (False: re-quantized to Q8)
        if type_name in PACK_TYPES and self._pack_c(data, type_name):
            return
        if type_name in INT4_TYPES:   # a Q4_0 whose -8 d is no float16 (huge scales): float32 scales
            self._alloc("q4")
            for r0, q, d, m in int4_blocks(data, type_name):
                pack_q4(q, d, m, half=False, out=self._rows(r0, len(q)))
            return
        self._alloc("q8")             # every other type (and a Q5_0 whose -16 d is no float16): re-quantized
        self.exact = False
        for r0, w in dequant_rows(data, type_name, shape):
            pack_q8(*quantize_blocks_q8(w), out=self._rows(r0, len(w)))

    @classmethod
    def from_tiles(cls, cached) -> "NativeMat":
        """A matrix over tiles already packed (a tile_cache entry's: fmt, n, k, exact, tiles, block)."""
        m = cls.__new__(cls)
        m.n, m.k, m.fmt, m.exact, m.tiles, m.block, m._arena = (cached.n, cached.k, cached.fmt, cached.exact,
                                                                 cached.tiles, cached.block, None)
        return m

    def _alloc(self, fmt: str) -> None:
        self.fmt = fmt
        shape = (-(-self.n // TR), tile_bytes(fmt, self.k))
        if self._arena is None:
            self.tiles = np.empty(shape, np.uint8)
        else:
            self.tiles, self.block = self._arena.take(*shape)

    def _rows(self, r0: int, n: int) -> np.ndarray:
        """The tiles that rows r0..r0+n-1 go to (chunks start at multiples of TR rows)."""
        return self.tiles[r0 // TR: r0 // TR - (-n // TR)]

    def _pack_c(self, data: np.ndarray, type_name: str) -> bool:
        """Tiles straight from the file's blocks by the C packer, in row chunks whose file pages are handed back
        as they are done (False where the format needs float32 scales: a Q4_0 / Q5_0 whose -8 d / -16 d is no
        float16)."""
        self._alloc(PACK_TYPES[type_name][1])
        for r0 in range(0, self.n, CHUNK_ROWS):
            part = data[r0: r0 + CHUNK_ROWS]
            ok = pack_tiles_c(part if part.strides[-1] == 1 else np.ascontiguousarray(part), type_name, self.k,
                              self._rows(r0, len(part)))
            release_pages(part)
            if not ok:
                return False
        return True

    @property
    def nbytes(self) -> int:
        return self.tiles.nbytes

    @property
    def fmt_index(self) -> int:
        """The format's number in kernels.c's F_* enum (FORMATS' order), for the kernels that take any format."""
        return list(FORMATS).index(self.fmt)

    @staticmethod
    def can_fuse(mats: list) -> bool:
        """Stackable: one format and width, and whole tiles each (a tile never spans two members' outputs)."""
        return all(type(m) is NativeMat and m.k == mats[0].k and m.fmt == mats[0].fmt and m.n % TR == 0
                   for m in mats)

    @classmethod
    def fuse(cls, mats: list["NativeMat"]) -> "NativeMat":
        """One matrix stacking mats' tiles; the members keep views of it (no second copy)."""
        f = cls.__new__(cls)
        f.n, f.k, f.fmt, f.exact = sum(m.n for m in mats), mats[0].k, mats[0].fmt, all(m.exact for m in mats)
        f._arena = f.block = None
        if _end_to_end(mats):      # loaded one after another into one arena block: a view is the stack
            first = mats[0].tiles
            f.tiles = np.lib.stride_tricks.as_strided(first, (sum(m.tiles.shape[0] for m in mats), first.shape[1]))
            return f
        f.tiles = np.concatenate([m.tiles for m in mats])
        t0 = 0
        for m in mats:
            m.tiles, m.block = f.tiles[t0: t0 + m.tiles.shape[0]], None
            t0 += m.tiles.shape[0]
        return f

    def dequantize(self) -> np.ndarray:
        """The float32 weight the kernel computes with (for tests)."""
        return dequantize_tiles(self.tiles, self.fmt, self.n, self.k)

    def rows_kernel(self, ids: np.ndarray, out: np.ndarray):
        """Rows `ids` of the matrix (float32 [n, K], zeros for an id out of range) read back out of the tiles:
        a tied embedding's lookup with no second copy of the table. Only where the tiles are exact."""
        if not self.exact or ids.dtype != np.int32 or out.dtype != np.float32 or not out.flags.c_contiguous:
            return None
        return bind("kvg_tile_rows", ptr(self.tiles), self.fmt_index, self.tiles.strides[0], self.k,
                    ptr(ids), out.shape[0], ptr(out), self.n, keep=(self.tiles, ids, out), indexes=True)

    def _bind(self, x: Q8Act, outs: list[np.ndarray]):
        ends = np.cumsum([o.shape[-1] for o in outs]).astype(np.int64)
        if ends[-1] != self.n or any(o.shape[0] != x.m or not o.flags.c_contiguous for o in outs) or any(
                e % TR for e in ends[:-1]):
            raise ValueError(f"matmul outputs {[o.shape for o in outs]} for [{x.m}, {self.n}]")
        outp = np.array([ptr(o) for o in outs], np.int64)
        return bind(f"kvg_matmul_{self.fmt}", ptr(self.tiles), self.n, self.k, ptr(x.q), ptr(x.d), ptr(x.s), x.m,
                    len(outs), ptr(ends), ptr(outp), self.tiles.strides[0], ptr(x.h),
                    keep=(self.tiles, x, outs, ends, outp))

    def kernel(self, x: Q8Act, out: np.ndarray):
        return self._bind(x, [out])

    def glu_kernel(self, x: Q8Act, out: np.ndarray, kind: str):
        """out [M, n/2] = act(x gate^T) * (x up^T) for this matrix stacking gate (first half) and up (kind:
        "swiglu" or "geglu"), without the two products in memory. None unless the halves are whole tiles."""
        f = self.n // 2
        if self.n % (2 * TR) or out.shape != (x.m, f) or out.dtype != np.float32 or not out.flags.c_contiguous:
            return None
        return bind("kvg_matmul_glu", ptr(self.tiles), f, self.k, ptr(x.q), ptr(x.d), ptr(x.s), x.m, ptr(out),
                    self.tiles.strides[0], ptr(x.h), self.fmt_index, GATED_KINDS[kind], 0,
                    keep=(self.tiles, x, out))

    def kernel_split(self, x: Q8Act, outs: list[np.ndarray]):
        """One run of the stacked matrix writing each member's columns into its own output [M, n_i]."""
        return self._bind(x, outs)


class ExpertScratch:
    """kvg_moe_tiles' working memory for n tokens: the rows of the tokens routed to one expert (as Q8), their
    gated products (float32, and as Q8 for the down matrix) and its outputs, and the routing."""

    def __init__(self, n: int, e: int, f: int, n_exp: int, n_used: int):
        self.dims = (n, e, f, n_exp, n_used)
        self.rows, self.hq = Q8Act(n, e), Q8Act(n, f)
        self.h, self.u = np.empty((n, f), np.float32), np.empty((n, f), np.float32)
        self.y, self.p = np.empty((n, e), np.float32), np.empty((n, n_exp), np.float32)
        self.chosen, self.w = np.empty((n, n_used), np.int64), np.empty((n, n_used), np.float32)
        self.tokens = np.empty(n * n_used, np.int64)

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes + self.hq.nbytes + sum(a.nbytes for a in (self.h, self.u, self.y, self.p, self.chosen,
                                                                          self.w, self.tokens))


def q8_slots(a: Q8Act) -> tuple[int, int, int, int]:
    return ptr(a.q), ptr(a.d), ptr(a.s), ptr(a.h)


def experts_kernel(x: np.ndarray, x_q8, router: np.ndarray, mats: list[NativeMat], n_used: int, norm: bool,
                   out: np.ndarray, scratch: ExpertScratch):
    """A mixture of SwiGLU experts over their tiles (kvg_moe_tiles): x float32 [n, E] (x_q8(): its Q8 form),
    router float32 [X, E], mats the gate, up and down experts stacked ([X F, E], [X F, E], [X E, F]). None
    where a matrix is not tiles or an expert's rows do not start on a tile."""
    gate, up, down = mats
    n, e = x.shape
    n_exp = router.shape[0]
    f = gate.n // n_exp
    if (not all(type(m) is NativeMat for m in mats) or f % TR or e % TR or (up.n, up.k, gate.k) != (gate.n, e, e)
            or (down.n, down.k) != (n_exp * e, f) or x.strides[1] != 4 or out.strides[1] != 4
            or router.dtype != np.float32 or not router.flags.c_contiguous or scratch.dims != (n, e, f, n_exp, n_used)):
        return None
    sc, xq = scratch, x_q8()
    return bind("kvg_moe_tiles", ptr(x), n, e, x.strides[0] // 4, ptr(router), n_exp,
                *(ptr(m.tiles) for m in mats), *(m.fmt_index for m in mats), *(m.tiles.strides[0] for m in mats),
                f, int(n_used), int(norm), ptr(out), out.strides[0] // 4, *q8_slots(xq), *q8_slots(sc.rows),
                ptr(sc.h), ptr(sc.u), *q8_slots(sc.hq), ptr(sc.y), ptr(sc.p), ptr(sc.chosen), ptr(sc.w),
                ptr(sc.tokens), keep=(x, xq, router, [m.tiles for m in mats], out, sc))


def as_rows(a: np.ndarray) -> np.ndarray:
    """A matmul input [..., K] as the [M, K] matrix with unit-stride rows the kernels read."""
    a2 = a.reshape(-1, a.shape[-1]) if a.flags.c_contiguous else a
    if a2.ndim != 2 or a2.strides[1] != 4:
        raise ValueError(f"native matmul input of shape {a.shape} is not a row-strided matrix")
    return a2

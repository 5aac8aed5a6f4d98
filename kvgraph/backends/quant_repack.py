"""GGUF quantized blocks -> the layouts torch's CPU weight-only-quantized matmuls take. numpy only (no torch).

Q4_0, Q4_1 and Q4_K are group-wise 4-bit formats with one (scale, min) per 32 weights, which is exactly
torch's int4pack format (`_weight_int4pack_mm_for_cpu`, group size 32):

    w = (q - 8) * scale + zero        q in [0, 15], one (scale, zero) per 32 consecutive weights of a row

    Q4_0  w = (q - 8) * d                     -> scale = d,       zero = 0
    Q4_1  w = q * d + m                       -> scale = d,       zero = m + 8 d
    Q4_K  w = q * (d sc_j) - dmin m_j         -> scale = d sc_j,  zero = 8 d sc_j - dmin m_j

(`int4_blocks` gives the same blocks as w = q * d + m, the form kvgraph's native kernels use.)
          (a 256-weight super-block holds 8 sub-blocks j of 32, each with 6-bit sc_j and m_j)

`int4_groups` yields the nibbles unchanged plus the (scale, zero) pairs in float32; the only loss the
kernel adds is the bfloat16 rounding of scale and zero (it reads them as bf16).

Every other type is dequantized (exactly, with `gguf.quants`) in row chunks and, for int8 weights,
re-quantized per output row (`int8_rows`): torch's `_weight_int8pack_mm` takes one scale per output
channel, so Q8_0's per-32 block scales do not map exactly.

Chunks are small and each chunk's memory-mapped file pages are handed back to the kernel after use
(`release_pages`), so repacking a file never holds the whole file plus its repacked copy resident.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from ..gguf.reader import release_pages
from ..gguf.types import dequantize
from .reference import check_indices

GROUP = 32                  # int4pack group size: Q4_0 / Q4_1 blocks, Q4_K sub-blocks
INT4_TYPES = frozenset({"Q4_0", "Q4_1", "Q4_K"})
CHUNK_ROWS = 4096           # rows dequantized at a time (a multiple of torch's 64-row packing blocks)


def _f16(raw: np.ndarray, at: int) -> np.ndarray:
    """The float16 at byte `at` of each block, as float32, shape [..., 1]."""
    return raw[..., at: at + 2].view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """16 bytes per 32-weight group -> 32 values: the low nibbles are weights 0..15, the high 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _q4_0(raw: np.ndarray):
    blocks = raw.reshape(raw.shape[0], -1, 18)
    d = _f16(blocks, 0)[..., 0]
    return _nibbles(blocks[..., 2:]), d, np.float32(-8) * d


def _q4_1(raw: np.ndarray):
    blocks = raw.reshape(raw.shape[0], -1, 20)
    return _nibbles(blocks[..., 4:]), _f16(blocks, 0)[..., 0], _f16(blocks, 2)[..., 0]


def _k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K's 12 bytes of packed 6-bit scales and mins -> (sc, mn) uint8 [..., 8] (gguf's get_scale_min)."""
    sc = np.concatenate([s[..., 0:4] & 63, (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)], axis=-1)
    mn = np.concatenate([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], axis=-1)
    return sc, mn


def _k_nibbles(qs: np.ndarray, rows: int) -> np.ndarray:
    """128 bytes per super-block: 4 chunks of 32 bytes, each the low nibbles of one sub-block and the high
    nibbles of the next -> [rows, nb * 256] in order."""
    qs = qs.reshape(rows, -1, 4, 32)
    return np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(rows, -1)


def kquant_parts(raw: np.ndarray, type_name: str) -> dict[str, np.ndarray]:
    """A Q4_K / Q5_K / Q6_K matrix's blocks as they are stored (raw bytes [rows, bytes_per_row]):
    q uint8 [rows, K] (Q4_K 0..15, Q5_K 0..31, Q6_K 0..63), the super-blocks' float16 d (and dmin) [rows, nb],
    and the sub-block scales: sc, mn uint8 [rows, nb * 8] (Q4_K / Q5_K), sc int8 [rows, nb * 16] (Q6_K).
    gguf: Q4_K / Q5_K  w = (d sc) q - dmin mn;  Q6_K  w = (d sc) (q - 32)."""
    rows = raw.shape[0]
    if type_name == "Q6_K":
        b = raw.reshape(rows, -1, 210)
        ql = b[..., :128].reshape(rows, -1, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 1, 2, 1)
        ql = (ql & 0x0F).reshape(rows, -1, 4, 32)
        qh = b[..., 128:192].reshape(rows, -1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 1, 4, 1)
        qh = (qh & 0x03).reshape(rows, -1, 4, 32)
        q = (ql.reshape(rows, -1, 8, 32) | (qh.reshape(rows, -1, 8, 32) << 4)).reshape(rows, -1)
        return {"q": q, "d": b[..., 208:210].copy().view(np.float16)[..., 0],
                "sc": np.ascontiguousarray(b[..., 192:208]).view(np.int8).reshape(rows, -1)}
    size = 144 if type_name == "Q4_K" else 176
    b = raw.reshape(rows, -1, size)
    sc, mn = _k_scales(b[..., 4:16])
    q = _k_nibbles(b[..., size - 128:], rows)
    if type_name == "Q5_K":
        qh = b[..., 16:48].reshape(rows, -1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)
        q |= ((qh & 1) << 4).reshape(rows, -1)
    return {"q": q, "d": b[..., 0:2].copy().view(np.float16)[..., 0], "dmin": b[..., 2:4].copy().view(np.float16)[..., 0],
            "sc": sc.reshape(rows, -1), "mn": mn.reshape(rows, -1)}


def _q4_k(raw: np.ndarray):
    p = kquant_parts(raw, "Q4_K")
    rows, nb = p["d"].shape
    scale = p["d"].astype(np.float32)[..., None] * p["sc"].reshape(rows, nb, 8).astype(np.float32)
    low = -(p["dmin"].astype(np.float32)[..., None] * p["mn"].reshape(rows, nb, 8).astype(np.float32))
    return p["q"].reshape(rows, -1, GROUP), scale.reshape(rows, -1), low.reshape(rows, -1)


_INT4 = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q4_K": _q4_k}


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """4 bytes per block (little-endian uint32, bit j = element j) -> 0 / 16 per element, [..., 32]."""
    return np.unpackbits(qh, axis=-1, bitorder="little") << 4


def _q5_0(raw: np.ndarray):
    blocks = raw.reshape(raw.shape[0], -1, 22)
    d = _f16(blocks, 0)[..., 0]
    return _nibbles(blocks[..., 6:]) | _fifth_bits(blocks[..., 2:6]), d, np.float32(-16) * d


def _q5_1(raw: np.ndarray):
    blocks = raw.reshape(raw.shape[0], -1, 24)
    return _nibbles(blocks[..., 8:]) | _fifth_bits(blocks[..., 4:8]), _f16(blocks, 0)[..., 0], _f16(blocks, 2)[..., 0]


_BLOCKS = {**_INT4, "Q5_0": _q5_0, "Q5_1": _q5_1}


def int4_blocks(data: np.ndarray, type_name: str, chunk_rows: int | None = None
                ) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """Row chunks of a Q4_0 / Q4_1 / Q4_K (or Q5_0 / Q5_1) matrix (raw bytes [rows, bytes_per_row]):
    (first row, q uint8 [r, K] in [0, 15] (Q5: [0, 31]), d f32 [r, K/32], m f32 [r, K/32]) with
    w = q * d + m, every value exactly as gguf.quants computes it (Q4_0: m = -8 d; Q5_0: m = -16 d;
    Q4_K: d = d_super sc, m = -dmin_super mn)."""
    split = _BLOCKS[type_name]
    chunk_rows = chunk_rows or CHUNK_ROWS
    for r0 in range(0, data.shape[0], chunk_rows):
        part = data[r0: r0 + chunk_rows]
        q, d, m = split(np.ascontiguousarray(part))
        yield r0, q.reshape(part.shape[0], -1), d, m
        release_pages(part)       # read by now (the split above copied what it needs)


def int4_groups(data: np.ndarray, type_name: str, chunk_rows: int | None = None
                ) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """int4_blocks in torch int4pack's form: (first row, q, scale, zero) with w = (q - 8) * scale + zero,
    i.e. scale = d and zero = m + 8 d (exactly 0 for Q4_0)."""
    for r0, q, d, m in int4_blocks(data, type_name, chunk_rows):
        yield r0, q, d, m + np.float32(8) * d


def dequant_rows(data: np.ndarray, type_name: str, shape: tuple[int, ...], chunk_rows: int | None = None
                 ) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, float32 [r, K]) chunks of a 2-D tensor of any GGUF type, dequantized with gguf.quants."""
    k = shape[-1]
    chunk_rows = chunk_rows or CHUNK_ROWS
    for r0 in range(0, shape[0], chunk_rows):
        part = data[r0: r0 + chunk_rows]
        if type_name == "F32":
            w = np.array(part, np.float32)
        else:
            w = dequantize(np.ascontiguousarray(part), type_name)
            w = w.astype(np.float32, copy=False).reshape(-1, k)
        release_pages(part)
        yield r0, w


def bf16_round(x: np.ndarray) -> np.ndarray:
    """float32 -> the nearest bfloat16 value (ties to even), still as float32."""
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
    bits = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return bits.view(np.float32)


def int8_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8: w ~= q * scale[:, None], q in [-127, 127]. The scale (max|w_row| / 127) is
    rounded to a bfloat16 value first, and q is computed with that rounded scale, so handing the scale to
    the kernel in bf16 adds no error beyond the int8 rounding itself."""
    amax = np.abs(w).max(axis=1)
    scale = bf16_round(np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32))
    low = amax / scale > np.float32(127)            # rounded down too far: |w| / scale would clip
    if low.any():
        scale[low] = (scale[low].view(np.uint32) + np.uint32(0x10000)).view(np.float32)
    q = np.rint(w / scale[:, None])
    np.clip(q, -127, 127, out=q)
    return q.astype(np.int8), scale


class Q8_0Rows:
    """Rows of a Q8_0 matrix dequantized on demand from the raw (memory-mapped) blocks: the token embedding
    lookup reads only the rows of this ubatch's tokens, bit-identical to gguf.quants.dequantize."""

    BLOCK = 34   # float16 d + 32 int8

    def __init__(self, data: np.ndarray, shape: tuple[int, int]):
        self.data, self.shape = data, shape

    def kernel(self, ids: np.ndarray, out: np.ndarray):
        n, k = out.shape
        raw = np.empty((n, self.data.shape[1]), np.uint8)
        blocks = raw.reshape(n, k // GROUP, self.BLOCK)
        d = blocks[..., 0:2].view(np.float16)                     # [n, nb, 1]
        q = blocks[..., 2:].view(np.int8)                         # [n, nb, 32]
        out_b = out.reshape(n, k // GROUP, GROUP)
        data = self.data

        def run():
            check_indices(ids, data.shape[0], "the embedding lookup")
            np.take(data, ids, axis=0, out=raw)
            np.multiply(q, d, out=out_b, dtype=np.float32)
        return run


class AnyRows:
    """Row lookup for any GGUF type: gather the raw rows, dequantize just those (gguf.quants)."""

    def __init__(self, data: np.ndarray, type_name: str, shape: tuple[int, int]):
        self.data, self.type_name, self.shape = data, type_name, shape

    def kernel(self, ids: np.ndarray, out: np.ndarray):
        data = self.data
        if self.type_name in ("F32", "F16"):
            tmp = out if data.dtype == np.float32 else np.empty(out.shape, data.dtype)

            def run_typed():
                check_indices(ids, data.shape[0], "the embedding lookup")
                np.take(data, ids, axis=0, out=tmp)
                if tmp is not out:
                    np.copyto(out, tmp)
            return run_typed
        raw = np.empty((out.shape[0], data.shape[1]), data.dtype)

        def run():
            check_indices(ids, data.shape[0], "the embedding lookup")
            np.take(data, ids, axis=0, out=raw)
            np.copyto(out, dequantize(raw, self.type_name).reshape(out.shape))
        return run


def row_reader(data: np.ndarray, type_name: str, shape: tuple[int, ...]):
    if type_name == "Q8_0":
        return Q8_0Rows(data, shape)
    return AnyRows(data, type_name, shape)

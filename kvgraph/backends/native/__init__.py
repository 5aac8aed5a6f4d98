"""kvgraph's own CPU kernels (kernels.c), compiled with the system C compiler on first use and loaded with ctypes.

kernels.c is built for one instruction set at a time -- AVX-512 (F, BW, VL, VNNI), AVX2 (+ FMA, F16C) or
portable C -- with explicit flags, never -march=native (which would tie a build to one machine and, on
virtual machines whose CPUs advertise AMX that faults, emit AMX). At run time a probe (cpu.c, built with
no instruction-set flags) says which sets the CPU runs, and the best of those builds is loaded;
KVGRAPH_ISA=avx512|avx2|portable forces one. Builds are cached under $KVGRAPH_HOME/native/<hash of source,
compiler and flags>/, each about a second, once per machine. Without a C compiler, or with
KVGRAPH_NATIVE=0, `library()` returns None and the torch backend uses torch's own quantized kernels instead.

Each kernel takes one pointer to int64 argument slots (see kernels.c); `bind` packs the slots once, at
compile time, and returns a closure that costs one ctypes call per run.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from ...errors import IndexOutOfRangeError, InvalidArgumentError

SOURCE = Path(__file__).with_name("kernels.c")
PROBE = Path(__file__).with_name("cpu.c")
# -fopenmp-simd: the kernels' `omp simd` loops vectorize as written (no OpenMP runtime: the threads are
# kernels.c's own pool)
FLAGS = ["-O3", "-fopenmp-simd", "-pthread", "-shared", "-fPIC", "-std=c11"]
# The builds, in the order of cpu.c's levels; each one's flags are all it may assume of the CPU.
ISA_FLAGS = {
    "portable": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni",
               "-mprefer-vector-width=512"],
}
ISAS = tuple(ISA_FLAGS)
ISA_NAMES = {"portable": "portable C", "avx2": "AVX2", "avx512": "AVX-512 VNNI"}
KERNELS = ("kvg_quantize_q8", "kvg_matmul_q4", "kvg_matmul_q4h", "kvg_matmul_q5h", "kvg_matmul_q8", "kvg_matmul_q4k",
           "kvg_matmul_q5k", "kvg_matmul_q6k", "kvg_rms_norm",
           "kvg_gated", "kvg_rope", "kvg_set_rows", "kvg_attention", "kvg_add", "kvg_get_rows_q8_0", "kvg_mul_rows",
           "kvg_tile_rows", "kvg_matmul_glu", "kvg_matmul_f32", "kvg_moe_f32", "kvg_moe_tiles", "kvg_gated_delta_net",
           "kvg_kquant_rows", "kvg_checksum",
           "kvg_pack_tiles", "kvg_stream_read", "kvg_ssm_conv", "kvg_ssm_scan", "kvg_ssm_scan2",
           "kvg_get_rows_f32", "kvg_act", "kvg_copy", "kvg_set_rows_q8_0")

_lib: ctypes.CDLL | None = None
_why_not: str | None = None
_level: int | None = None


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _cache_dir() -> Path:
    from ...registry import model_home

    return model_home() / "native"


def _compiler_id(cc: str) -> bytes:
    """Which compiler `cc` is: its resolved file, size and time (a new compiler version is a new file), read
    without running it."""
    path = os.path.realpath(shutil.which(cc) or cc)
    st = os.stat(path)
    return f"{path} {st.st_size} {st.st_mtime_ns}".encode()


def _build(cc: str, flags: list[str], source: Path = SOURCE) -> Path:
    """The shared library of `source` built with `flags` (cached by source, flags and compiler). Raises
    OSError."""
    src = source.read_bytes()
    # importlib's SipHash (the one hash-based .pyc files use): 64 bits without loading OpenSSL (~3 MB resident)
    tag = importlib.util.source_hash(src + " ".join(flags).encode() + _compiler_id(cc)).hex()
    out = _cache_dir() / tag / f"lib{source.stem}.so"
    if out.exists():
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError:                    # an unwritable KVGRAPH_HOME: build into the temp folder instead
        out = Path(tempfile.gettempdir()) / f"kvgraph-native-{os.getuid()}" / tag / out.name
        if out.exists():
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
    import subprocess     # only on a build (~0.5 MB resident)

    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_out = Path(tmp) / out.name
        try:
            r = subprocess.run([cc, *flags, str(source), "-o", str(tmp_out), "-lm"], capture_output=True,
                               text=True, timeout=300)
        except subprocess.SubprocessError as exc:
            raise OSError(f"{cc} failed: {exc}") from None
        if r.returncode != 0:
            raise OSError(f"{cc} failed: {r.stderr.strip()[-2000:]}")
        os.replace(tmp_out, out)       # atomic: a concurrent build of the same source is harmless
    return out


def cpu_level() -> int:
    """How far up ISAS this CPU goes (cpu.c's probe; 0, portable, where it cannot be built or run)."""
    global _level
    if _level is None:
        _level = 0
        cc = _compiler()
        if cc is not None and platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
            try:
                probe = ctypes.CDLL(str(_build(cc, ["-O2", "-shared", "-fPIC"], PROBE)))
                _level = int(probe.kvg_cpu_level())
            except OSError:
                pass
    return _level


def runnable_isas() -> tuple[str, ...]:
    """The builds this CPU runs, slowest first."""
    return ISAS[: cpu_level() + 1]


def _chosen_isa() -> str:
    """KVGRAPH_ISA's choice, checked against the CPU, or the best build it runs. Raises InvalidArgumentError
    (a user's setting: one line naming the builds this CPU runs)."""
    want = os.environ.get("KVGRAPH_ISA", "auto").strip().lower()
    runs = runnable_isas()
    if want in ("", "auto"):
        return runs[-1]
    these = f"this CPU runs {', '.join(runs)}; set KVGRAPH_ISA to one of those or to auto (the best, {runs[-1]})"
    if want not in ISAS:
        raise InvalidArgumentError(f"KVGRAPH_ISA={want!r} is not a build of the C kernels ({', '.join(ISAS)}): "
                                   f"{these}.")
    if want not in runs:
        raise InvalidArgumentError(f"KVGRAPH_ISA={want}, but this CPU does not run {ISA_NAMES[want]}: {these}.")
    return want


def build(isa: str) -> ctypes.CDLL:
    """The kernels built for one instruction set (ISAS), loaded. The caller makes sure the CPU runs it."""
    cc = _compiler()
    if cc is None:
        raise OSError("no C compiler found (set CC or install gcc)")
    return load(_build(cc, FLAGS + ISA_FLAGS[isa]))


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None when it cannot be used (`why_not()` says why). Raises
    InvalidArgumentError for a KVGRAPH_ISA this CPU cannot run."""
    global _lib, _why_not
    if _lib is not None or _why_not is not None:
        return _lib
    if os.environ.get("KVGRAPH_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        _why_not = "disabled by KVGRAPH_NATIVE=0"
        return None
    if _compiler() is None:
        _why_not = "no C compiler found (set CC or install gcc)"
        return None
    isa = _chosen_isa()
    try:
        _lib = build(isa)
    except OSError as exc:
        _why_not = f"could not build the native kernels: {exc}"
        print(f"kvgraph: {_why_not}; falling back to torch's kernels (or numpy)", file=sys.stderr)
    return _lib


def load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    for name in KERNELS:
        getattr(lib, name).argtypes = [ctypes.c_void_p]
        getattr(lib, name).restype = None
    lib.kvg_simd.restype = lib.kvg_threads.restype = ctypes.c_int
    lib.kvg_run.argtypes, lib.kvg_run.restype = [ctypes.c_void_p, ctypes.c_int64], ctypes.c_int64
    lib.kvg_take_bad_indices.argtypes, lib.kvg_take_bad_indices.restype = [], ctypes.c_int64
    lib.kvg_set_threads.argtypes, lib.kvg_set_threads.restype = [ctypes.c_int64], None
    return lib


def isa_of(lib: ctypes.CDLL) -> str:
    """The instruction set a loaded build was compiled for."""
    return ISAS[lib.kvg_simd()]


def describe() -> str:
    """One line on the kernels in use: instruction set and threads, or why there are none."""
    lib = library()
    if lib is None:
        return f"no C kernels ({why_not()})"
    return f"kvgraph C kernels ({ISA_NAMES[isa_of(lib)]}, {lib.kvg_threads()} threads)"


def why_not() -> str | None:
    library()
    return _why_not


def set_threads(n: int) -> None:
    """Threads for the kernels' pool (kernels.c's parallel_for), the caller included; workers are started
    on first need and kept."""
    lib = library()
    if lib is not None:
        lib.kvg_set_threads(n)


def ptr(a) -> int:
    """The data address of a numpy array or torch tensor."""
    if isinstance(a, np.ndarray):
        return a.ctypes.data
    return a.data_ptr()


def f64_bits(x: float) -> int:
    return int(np.float64(x).view(np.int64))


def _refuse_bad_indices(n: int, where: str) -> None:
    raise IndexOutOfRangeError(f"{n} index(es) outside their table reached {where}; the step was refused "
                               "(an out-of-range token id or cache slot).")


def bind(name: str, *slots: int, keep: tuple = (), indexes: bool = False) -> Callable[[], None]:
    """A closure calling kernel `name` with these argument slots (and keeping `keep` alive with it).
    indexes: the kernel reads or writes rows by index and counts the ones out of range (see in_range in
    kernels.c); the closure raises IndexOutOfRangeError when there were any."""
    lib = library()
    fn = getattr(lib, name)
    args = np.array(slots, dtype=np.int64)
    addr = args.ctypes.data

    if indexes:
        take = lib.kvg_take_bad_indices

        def run():
            fn(addr)
            if n := take():
                _refuse_bad_indices(n, name)
    else:
        def run():
            fn(addr)
    run.__qualname__ = name
    run.keep = (args, keep)          # the slot array and every buffer it points into live as long as the kernel
    run.native_call = (ctypes.cast(fn, ctypes.c_void_p).value, addr)
    run.in_c = True
    return run


CHECK_CHUNK = 1 << 20       # kernels.c's CHECK_CHUNK


def checksum(data: np.ndarray) -> int:
    """kvg_checksum of an array's bytes (contiguous): the same 64-bit value on every build and thread count."""
    flat = data.reshape(-1).view(np.uint8)
    chunks = np.empty(max(1, -(-flat.size // CHECK_CHUNK)), np.uint64)
    out = np.zeros(1, np.uint64)
    bind("kvg_checksum", ptr(flat), flat.size, ptr(chunks), ptr(out), keep=(flat, chunks, out))()
    return int(out[0])


def read_bandwidth(arrays: list[np.ndarray], repeats: int = 5) -> float:
    """Bytes per second the kernels' threads stream-read `arrays` at (kvg_stream_read over each in turn, the
    best of `repeats` passes). Given a model's weight arrays, the bytes a decode step reads where they lie
    (huge or file-mapped pages): its memory roofline."""
    import time

    runs, total = [], 0
    for a in arrays:
        flat = a.reshape(-1).view(np.uint8) if a.flags.c_contiguous else np.ascontiguousarray(a).view(np.uint8)
        n = flat.size // 64 * 64
        if n:
            out = np.zeros(1, np.uint64)
            runs.append(bind("kvg_stream_read", ptr(flat), n, ptr(out), keep=(flat, out)))
            total += n
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for run in runs:
            run()
        best = min(best, time.perf_counter() - t0)
    return total / best


def batch(kernels: list[Callable[[], None]]) -> list[Callable[[], None]]:
    """kernels with every run of two or more consecutive native kernels replaced by one kvg_run call
    (same calls, same order; KVGRAPH_NATIVE_BATCH=0 keeps one Python call per kernel, for profiling)."""
    if os.environ.get("KVGRAPH_NATIVE_BATCH", "1") == "0":
        return kernels
    out: list[Callable[[], None]] = []
    run_: list[Callable[[], None]] = []

    def flush():
        if len(run_) == 1:
            out.append(run_[0])
        elif run_:
            out.append(_run_list(list(run_)))
        run_.clear()

    for k in kernels:
        if hasattr(k, "native_call"):
            run_.append(k)
        else:
            flush()
            out.append(k)
    flush()
    return out


def _run_list(kernels: list) -> Callable[[], None]:
    run_all = library().kvg_run
    table = np.array([k.native_call for k in kernels], dtype=np.int64)
    addr, n = table.ctypes.data, len(kernels)

    def run():
        if bad := run_all(addr, n):
            _refuse_bad_indices(bad, f"kvg_run[{n}]")
    run.__qualname__ = f"kvg_run[{n}]"
    run.keep = (table, kernels)
    run.in_c = True
    return run


def in_c(kernel: Callable[[], None]) -> bool:
    """Whether a Program kernel is a call into the C kernels (alone or a batch of them)."""
    return getattr(kernel, "in_c", False)


# ---- weight packing (numpy; layouts documented in kernels.c) ---------------------------------------------------
QK = 32


def f16_exact(x: np.ndarray) -> bool:
    """Every value of float32 x is exactly a float16 (so storing it as float16 loses nothing)."""
    with np.errstate(over="ignore"):
        return bool(np.array_equal(x.astype(np.float16).astype(np.float32), x))


TR = 16                                   # weight rows per tile
GATED_KINDS = {"swiglu": 0, "geglu": 1}   # kvg_gated's and kvg_matmul_glu's kind: act(gate) * up, act SiLU / GELU
ACT_KINDS = GATED_KINDS | {"sigmoid": 2, "softplus": 3}   # kvg_act's: an activation alone
# format -> (bytes per group record, bytes of a super-block header: K-quants keep 8 records per super-block
# after a header of its float16 scales); the record layouts are kernels.c's, in its F_* order (kvg_tile_rows
# takes a format's index here)
FORMATS = {"q4h": (320, 0), "q4": (384, 0), "q5h": (384, 0), "q8": (544, 0), "q4k": (288, 64), "q5k": (352, 64),
           "q6k": (416, 32)}


def tile_bytes(fmt: str, k: int) -> int:
    rec, hdr = FORMATS[fmt]
    return k // QK * rec + k // 256 * hdr


def _padded(a: np.ndarray) -> np.ndarray:
    """a with zero rows appended up to a multiple of TR rows."""
    extra = -a.shape[0] % TR
    return a if not extra else np.concatenate([a, np.zeros((extra, *a.shape[1:]), a.dtype)])


def _word_tiles(words: np.ndarray) -> np.ndarray:
    """[N, G, W] 4-byte words (N a multiple of TR) -> [T, G, W, 64] bytes: vector w of group g of tile t holds
    word w of each of the tile's rows i at bytes 4i..4i+3."""
    n, g, nw = words.shape
    out = np.empty((n // TR, g, nw, TR), np.uint32)
    out[...] = words.reshape(n // TR, TR, g, nw).transpose(0, 2, 3, 1)
    return out.view(np.uint8).reshape(n // TR, g, nw, 4 * TR)


def _chunk_vectors(q: np.ndarray) -> np.ndarray:
    """[N, K] bytes -> [T, G, 8, 64] (rows padded to whole tiles): chunk vector c of group g of tile t holds
    weights 4c..4c+3 of the group for each of the tile's rows i, at bytes 4i..4i+3."""
    q = np.ascontiguousarray(_padded(q))
    return _word_tiles(q.view(np.uint32).reshape(q.shape[0], q.shape[1] // QK, 8))


def _tile_scales(d: np.ndarray, dtype) -> np.ndarray:
    """[N, B] -> [T, B, TR * itemsize] bytes: each block's values for the tile's rows."""
    d = _padded(np.asarray(d))
    n, b = d.shape
    return np.ascontiguousarray(d.astype(dtype).reshape(n // TR, TR, b).transpose(0, 2, 1)).view(np.uint8)


def _records(parts: list[np.ndarray], header: list[np.ndarray] | None = None,
             out: np.ndarray | None = None) -> np.ndarray:
    """Per-group parts [T, G, ...] -> tiles [T, bytes], written into out (the weight's own tile rows: no
    second copy) or a new array; with a header ([T, G / 8, ...] parts), each super-block of eight records
    follows its header."""
    t, g = parts[0].shape[:2]
    parts = [p.reshape(t, g, -1) for p in parts]
    rec = sum(p.shape[2] for p in parts)
    header = [h.reshape(t, g // 8, -1) for h in header or ()]
    hdr = sum(h.shape[2] for h in header)
    if out is None:
        out = np.empty((t, g * rec + g // 8 * hdr), np.uint8)
    if header:
        blocks = out.reshape(t, g // 8, hdr + 8 * rec)
        _fill(blocks, header)
        recs = blocks[:, :, hdr:]
        recs.shape = (t, g // 8, 8, rec)                # a view (raises rather than copy)
        parts = [p.reshape(t, g // 8, 8, -1) for p in parts]
    else:
        recs = out.reshape(t, g, rec)
    _fill(recs, parts)
    return out


def _fill(dest: np.ndarray, parts: list[np.ndarray]) -> None:
    """parts side by side along dest's last axis."""
    at = 0
    for p in parts:
        dest[..., at: at + p.shape[-1]] = p
        at += p.shape[-1]


def _nibbles(cv: np.ndarray) -> np.ndarray:
    """Chunk vectors' low four bits, 0-3 in the low nibbles of four 64-byte blocks and 4-7 in the high."""
    return (cv[:, :, :4] & 15) | ((cv[:, :, 4:] & 15) << 4)


def _fifth_bits(cv: np.ndarray) -> np.ndarray:
    """Bit 4 of every byte of the chunk vectors: 64 bits per chunk vector (bit b = byte b)."""
    return np.packbits((cv >> 4) & 1, axis=3, bitorder="little")


def pack_q4(q: np.ndarray, d: np.ndarray, m: np.ndarray, half: bool, out: np.ndarray | None = None) -> np.ndarray:
    """q uint8 [N, K] in [0, 15], d / m float32 [N, K/32] (w = q d + m) -> Q4 tiles [ceil(N/16), bytes] uint8,
    scales as float16 when half (the caller checks f16_exact) else float32."""
    sdt = np.float16 if half else np.float32
    return _records([_nibbles(_chunk_vectors(q)), _tile_scales(d, sdt), _tile_scales(m, sdt)], out=out)


def pack_q5(q: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    """q uint8 [N, K] in [0, 31], d / m float16-exact float32 [N, K/32] (w = q d + m) -> Q5 tiles: Q4's nibbles
    of the low four bits, the fifth bits, then float16 scales."""
    cv = _chunk_vectors(q)
    return _records([_nibbles(cv), _fifth_bits(cv), _tile_scales(d, np.float16), _tile_scales(m, np.float16)])


def pack_q8(q: np.ndarray, d: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """q int8 [N, K], d float16 [N, K/32] (w = q d) -> Q8 tiles."""
    return _records([_chunk_vectors(q.view(np.uint8)), _tile_scales(d, np.float16)], out=out)


def pack_kquant(fmt: str, p: dict[str, np.ndarray], out: np.ndarray | None = None) -> np.ndarray:
    """A K-quant matrix's parts (quant_repack.kquant_parts) -> "q4k" / "q5k" / "q6k" tiles, the file's own
    numbers: 6-bit q plus int8 scales per 16 (Q6_K), 4/5-bit q plus 6-bit sc / mn per 32 (Q4_K / Q5_K),
    float16 super-block scales."""
    cv = _chunk_vectors(p["q"])
    if fmt == "q6k":
        hi = cv >> 4
        planes = [hi[:, :, 4 * i] | (hi[:, :, 4 * i + 1] << 2) | (hi[:, :, 4 * i + 2] << 4) | (hi[:, :, 4 * i + 3] << 6)
                  for i in (0, 1)]
        sc = _tile_scales(p["sc"].view(np.uint8), np.uint8)           # [T, 2G, 16]: sub-blocks A, B of each group
        return _records([_nibbles(cv), *planes, sc.reshape(sc.shape[0], -1, 2 * TR)], [_tile_scales(p["d"], np.float16)],
                        out)
    parts = [_nibbles(cv)] + ([_fifth_bits(cv)] if fmt == "q5k" else [])
    parts += [_tile_scales(p["sc"], np.uint8), _tile_scales(p["mn"], np.uint8)]
    return _records(parts, [_tile_scales(p["d"], np.float16), _tile_scales(p["dmin"], np.float16)], out)


# GGUF block layouts whose bytes go into tiles unchanged: (block bytes, d at, m at (None: m = -k d), k, qh at,
# qs at, format). A block's nibbles byte j = q[j] | q[j + 16] << 4 is exactly a tile's byte for chunk
# vectors j / 4 and j / 4 + 4, so 4-byte words move as they are; Q8_0's int8 bytes likewise.
BLOCK_LAYOUTS = {"Q4_0": (18, 0, None, 8, None, 2, "q4h"), "Q4_1": (20, 0, 2, 0, None, 4, "q4h"),
                 "Q5_0": (22, 0, None, 16, 2, 6, "q5h"), "Q5_1": (24, 0, 2, 0, 4, 8, "q5h"),
                 "Q8_0": (34, 0, None, 0, None, 2, "q8")}


def pack_blocks(raw: np.ndarray, type_name: str, out: np.ndarray | None = None) -> np.ndarray | None:
    """Rows of a Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 matrix (raw bytes [N, bytes per row]) -> its tiles, moving
    the file's bytes without decoding them (the same tiles pack_q4 / pack_q5 / pack_q8 make from decoded
    values). None when a derived scale (Q4_0's -8 d, Q5_0's -16 d) is not exactly a float16."""
    size, d_at, m_at, k_m, qh_at, qs_at, fmt = BLOCK_LAYOUTS[type_name]
    b = _padded(raw)
    n, g = b.shape[0], b.shape[1] // size
    t = n // TR
    b = b.reshape(n, g, size)
    d = b[..., d_at: d_at + 2].view(np.float16)[..., 0]
    if fmt != "q8":
        if m_at is None:
            m32 = np.float32(-k_m) * d.astype(np.float32)
            if not f16_exact(m32):
                return None
            m = m32.astype(np.float16)
        else:
            m = b[..., m_at: m_at + 2].view(np.float16)[..., 0]
    nw = 8 if fmt == "q8" else 4                       # 4-byte words of q per block
    parts = [_word_tiles(b[..., qs_at: qs_at + 4 * nw].view(np.uint32))]
    if qh_at is not None:                              # fifth bits: chunk vector c, bit 4 r + e = element 4 c + e
        qh = b[..., qh_at: qh_at + 4].view(np.uint32)[..., 0].reshape(t, TR, g).astype(np.uint64)
        shifts = (4 * np.arange(TR, dtype=np.uint64)).reshape(1, TR, 1)
        parts.append(np.stack([np.bitwise_or.reduce(((qh >> np.uint64(4 * c)) & np.uint64(15)) << shifts, axis=1)
                               for c in range(8)], axis=2).view(np.uint8))  # [t, g, 8] words of 64 bits
    return _records(parts + [_tile_scales(s, np.float16) for s in ((d,) if fmt == "q8" else (d, m))], out=out)


PACK_TYPES = {"Q4_0": (0, "q4h"), "Q4_1": (1, "q4h"), "Q5_0": (2, "q5h"), "Q5_1": (3, "q5h"), "Q8_0": (4, "q8"),
              "Q4_K": (5, "q4k"), "Q5_K": (6, "q5k"), "Q6_K": (7, "q6k")}   # kernels.c's P_* and the tile format


def pack_tiles_c(raw: np.ndarray, type_name: str, k: int, out: np.ndarray) -> bool:
    """kvg_pack_tiles: rows of a PACK_TYPES matrix (raw bytes [N, bytes per row], N a multiple of TR unless
    it is the last part) into out, its tiles, the bytes pack_blocks / pack_kquant make. False where the
    format needs float32 scales (Q4_0's -8 d or Q5_0's -16 d no float16): the caller packs another way."""
    flag = np.zeros(1, np.int64)
    bind("kvg_pack_tiles", ptr(raw), raw.shape[0], k, raw.strides[0], PACK_TYPES[type_name][0], ptr(out),
         out.strides[0], ptr(flag), keep=(raw, out, flag))()
    if flag[0] < 0:
        raise MemoryError("kvg_pack_tiles: out of memory")
    return flag[0] == 0


def dequantize_tiles(tiles: np.ndarray, fmt: str, n: int, k: int) -> np.ndarray:
    """The float32 weights [n, K] that tiles of format fmt hold, computed as gguf computes them."""
    rec, hdr = FORMATS[fmt]
    t, g = tiles.shape[0], k // QK
    if hdr:
        r = tiles.reshape(t, g // 8, hdr + 8 * rec)
        head, recs = r[:, :, :hdr], r[:, :, hdr:].reshape(t, g, rec)
    else:
        head, recs = None, tiles.reshape(t, g, rec)

    def rows(a: np.ndarray, dtype) -> np.ndarray:
        """[T, B, TR * itemsize] bytes -> [n, B] values"""
        v = np.ascontiguousarray(a).view(dtype)
        return v.transpose(0, 2, 1).reshape(t * TR, -1)[:n]

    if fmt == "q8":
        cv = recs[:, :, :512].view(np.int8).reshape(t, g, 8, 4 * TR).astype(np.int32)
    else:
        nib = recs[:, :, :256].reshape(t, g, 4, 4 * TR)
        cv = np.concatenate([nib & 15, nib >> 4], axis=2).astype(np.int32)
        if fmt in ("q5h", "q5k"):
            cv |= np.unpackbits(recs[:, :, 256:320].reshape(t, g, 8, 8), axis=3, bitorder="little").astype(np.int32) << 4
        if fmt == "q6k":
            planes = recs[:, :, 256:384].reshape(t, g, 2, 1, 4 * TR) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 1, 4, 1)
            cv |= ((planes & 3).reshape(t, g, 8, 4 * TR)).astype(np.int32) << 4
    q = cv.reshape(t, g, 8, TR, 4).transpose(0, 3, 1, 2, 4).reshape(t * TR, k)[:n].astype(np.float32)
    f32 = np.float32
    if fmt == "q6k":
        d = rows(head[:, :, :32], np.float16).astype(f32)                              # [n, K/256]
        sc = rows(recs[:, :, 384:416].reshape(t, 2 * g, TR), np.int8).astype(f32)    # [n, K/16]
        scale = np.repeat(d, 16, axis=1) * sc
        return (scale[..., None] * (q - f32(32)).reshape(n, -1, 16)).reshape(n, k)
    if fmt in ("q4k", "q5k"):
        so = 320 if fmt == "q5k" else 256
        d, dmin = (np.repeat(rows(head[:, :, o: o + 32], np.float16).astype(f32), 8, axis=1) for o in (0, 32))
        scale = d * rows(recs[:, :, so: so + 16], np.uint8).astype(f32)
        low = dmin * rows(recs[:, :, so + 16: so + 32], np.uint8).astype(f32)
        return (scale[..., None] * q.reshape(n, g, QK) - low[..., None]).reshape(n, k)
    sdt, so = (np.float32, 256) if fmt == "q4" else (np.float16, {"q4h": 256, "q5h": 320, "q8": 512}[fmt])
    size = TR * np.dtype(sdt).itemsize
    w = q.reshape(n, g, QK) * rows(recs[:, :, so: so + size], sdt).astype(f32)[..., None]
    if fmt != "q8":
        w = w + rows(recs[:, :, so + size: so + 2 * size], sdt).astype(f32)[..., None]
    return w.reshape(n, k)


def quantize_blocks_q8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 [N, K] -> (q int8 [N, K], d float16 [N, K/32]): symmetric int8 per block of 32, as Q8_0 is
    made, with d = max|w| / 127 rounded up to a float16 (so that no |w| / d exceeds 127)."""
    n, k = w.shape
    blocks = w.reshape(n, k // QK, QK)
    amax = np.abs(blocks).max(axis=2)
    exact = amax / np.float32(127)
    d16 = exact.astype(np.float16)
    low = d16.astype(np.float32) < exact
    d16[low] = np.nextafter(d16[low], np.float16(np.inf))
    d = d16.astype(np.float32)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d > 0)
    q = np.clip(np.rint(blocks * inv[..., None]), -127, 127).astype(np.int8)
    return q.reshape(n, k), d16

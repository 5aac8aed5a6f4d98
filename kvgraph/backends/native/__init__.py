"""kvgraph's own CPU kernels (kernels.c), compiled with the system C compiler on first use and loaded with ctypes.

The shared library is cached under $KVGRAPH_HOME/native/<hash of source, compiler, flags and the instruction
sets they enable here>/, so it is built once per machine (about a second) and never loaded on another CPU.
Without a C compiler, or with KVGRAPH_NATIVE=0, `library()` returns None and the torch backend uses torch's
own quantized kernels instead (slower at batch size 1, same rules).

Each kernel takes one pointer to int64 argument slots (see kernels.c); `bind` packs the slots once, at
compile time, and returns a closure that costs one ctypes call per run.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from ...errors import IndexOutOfRangeError

SOURCE = Path(__file__).with_name("kernels.c")
# AMX tile instructions fault on some virtual machines whose CPUs advertise them: never emit them.
FLAGS = ["-O3", "-march=native", "-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16", "-fopenmp", "-shared", "-fPIC",
         "-std=c11"]
KERNELS = ("kvg_quantize_q8", "kvg_matmul_q4", "kvg_matmul_q4h", "kvg_matmul_q5h", "kvg_matmul_q8", "kvg_rms_norm",
           "kvg_gated", "kvg_rope", "kvg_set_rows", "kvg_attention", "kvg_add", "kvg_get_rows_q8_0", "kvg_mul_rows")

_lib: ctypes.CDLL | None = None
_why_not: str | None = None


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _cache_dir() -> Path:
    from ...registry import model_home

    return model_home() / "native"


def _target(cc: str, flags: list[str]) -> str:
    """What the flags compile for on this machine: with -march=native, the instruction sets the compiler
    enables here (so a KVGRAPH_HOME shared by two machines never loads a library built for the other's CPU);
    the CPU's own flags where the compiler cannot say."""
    if not any(f.startswith("-march=native") for f in flags):
        return platform.machine()
    try:
        out = subprocess.run([cc, *[f for f in flags if f.startswith("-m")], "-Q", "--help=target"],
                             capture_output=True, text=True, timeout=30).stdout
        enabled = sorted(line.split()[0] for line in out.splitlines() if line.strip().endswith("[enabled]"))
        if enabled:
            return " ".join(enabled)
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        return next((line for line in cpuinfo.splitlines() if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor() or platform.machine()


def _build(cc: str, flags: list[str] = FLAGS) -> Path:
    src = SOURCE.read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = src + " ".join(flags).encode() + version.encode() + _target(cc, flags).encode()
    tag = hashlib.sha256(key).hexdigest()[:16]
    out = _cache_dir() / tag / "libkvgraph_native.so"
    if out.exists():
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError:                    # an unwritable KVGRAPH_HOME: build into the temp folder instead
        out = Path(tempfile.gettempdir()) / f"kvgraph-native-{os.getuid()}" / tag / out.name
        if out.exists():
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_out = Path(tmp) / out.name
        r = subprocess.run([cc, *flags, str(SOURCE), "-o", str(tmp_out), "-lm"], capture_output=True, text=True,
                           timeout=300)
        if r.returncode != 0:
            raise OSError(f"{cc} failed: {r.stderr.strip()[-2000:]}")
        os.replace(tmp_out, out)       # atomic: a concurrent build of the same source is harmless
    return out


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None when it cannot be used (`why_not()` says why)."""
    global _lib, _why_not
    if _lib is not None or _why_not is not None:
        return _lib
    if os.environ.get("KVGRAPH_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        _why_not = "disabled by KVGRAPH_NATIVE=0"
        return None
    cc = _compiler()
    if cc is None:
        _why_not = "no C compiler found (set CC or install gcc)"
        return None
    try:
        _lib = load(_build(cc))
    except (OSError, subprocess.SubprocessError) as exc:
        try:        # a compiler without OpenMP (Apple's clang): the same kernels, one thread each
            _lib = load(_build(cc, [f for f in FLAGS if f != "-fopenmp"]))
            print(f"kvgraph: {cc} has no OpenMP; the C kernels run single-threaded", file=sys.stderr)
        except (OSError, subprocess.SubprocessError):
            _why_not = f"could not build the native kernels: {exc}"
            print(f"kvgraph: {_why_not}; falling back to torch's kernels (or numpy)", file=sys.stderr)
    return _lib


def build_portable() -> ctypes.CDLL:
    """The kernels built for any x86-64 / other CPU (no AVX2: the plain-C loops), for tests."""
    cc = _compiler()
    if cc is None:
        raise OSError("no C compiler")
    return load(_build(cc, [f for f in FLAGS if not f.startswith("-march")]))


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


def describe() -> str:
    """One line on the kernels in use: instruction set and threads, or why there are none."""
    lib = library()
    if lib is None:
        return f"no C kernels ({why_not()})"
    return f"kvgraph C kernels ({'AVX2' if lib.kvg_simd() else 'portable C'}, {lib.kvg_threads()} threads)"


def why_not() -> str | None:
    library()
    return _why_not


def set_threads(n: int) -> None:
    """Threads for the matmul kernels. With torch loaded this is torch's own OpenMP runtime (the same
    libgomp), so torch.set_num_threads and this agree."""
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


def pack_q4(q: np.ndarray, d: np.ndarray, m: np.ndarray, half: bool) -> np.ndarray:
    """q uint8 [N, K] in [0, 15], d / m float32 [N, K/32] (w = q d + m) -> Q4 rows [N, row_bytes] uint8,
    scales as float16 when half (the caller checks f16_exact) else float32."""
    n, k = q.shape
    g = k // QK
    groups = q.reshape(n, g, QK)
    pairs = groups[:, : g - g % 2].reshape(n, g // 2, 2, QK)
    parts = [(pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(n, -1)]
    if g % 2:
        last = groups[:, -1]
        parts.append(last[:, :16] | (last[:, 16:] << 4))
    sdt = np.float16 if half else np.float32
    parts += [np.ascontiguousarray(d.astype(sdt)).view(np.uint8), np.ascontiguousarray(m.astype(sdt)).view(np.uint8)]
    return np.ascontiguousarray(np.concatenate(parts, axis=1))


def pack_q5(q: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    """q uint8 [N, K] in [0, 31], d / m float16-exact float32 [N, K/32] (w = q d + m) -> Q5 rows: Q4's nibble
    layout of the low four bits, then the fifth bits (4 bytes per group, bit j = element j), then scales."""
    n, k = q.shape
    q4 = pack_q4(q & 15, d, m, half=True)
    bits = np.packbits((q >> 4).astype(np.uint8).reshape(n, k // QK, QK), axis=2, bitorder="little")
    return np.ascontiguousarray(np.concatenate([q4[:, : k // 2], bits.reshape(n, -1), q4[:, k // 2:]], axis=1))


def pack_q8(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    """q int8 [N, K], d float16 [N, K/32] (w = q d) -> Q8 rows [N, row_bytes] uint8."""
    return np.ascontiguousarray(np.concatenate([q.view(np.uint8), np.ascontiguousarray(d, np.float16).view(np.uint8)],
                                               axis=1))


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

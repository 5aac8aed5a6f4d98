"""What a loaded model keeps resident: its repacked weights, not the file's pages, and no freed heap."""
from __future__ import annotations

import platform
import subprocess
import sys

import numpy as np
import pytest

from kvgraph.backends import get_backend, native
from kvgraph.engine.context import Context
from kvgraph.engine.loader import load_model
from kvgraph.graph.inputs import UBatch
from tiny_models import TinySpec, write_tiny_llama

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")


def resident_pages(path) -> int:
    """Pages of this process's mappings of path that are in memory (the present bit of /proc/self/pagemap)."""
    n = 0
    with open("/proc/self/maps") as maps, open("/proc/self/pagemap", "rb") as pagemap:
        for line in maps:
            if line.rstrip().endswith(str(path)):
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                pagemap.seek(lo // 4096 * 8)
                entries = np.frombuffer(pagemap.read((hi - lo) // 4096 * 8), np.uint64)
                n += int(((entries >> np.uint64(63)) & np.uint64(1)).sum())
    return n


@linux
@pytest.mark.skipif(native.library() is None, reason="needs the C kernels")
def test_a_loaded_and_running_model_holds_none_of_its_files_pages(tmp_path):
    """The weights are repacked at load and the tied embedding is looked up in its tiles, so the file's
    pages (which the kernel maps in around every read) do not count again on top of the weights. (Float32
    matrices are the exception by design: they are used from the file, which is then their only copy.)"""
    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path, TinySpec(n_layer=2, n_embd=64, n_ff=128, weight_type="Q8_0"))
    ctx = Context(load_model(path, get_backend("native")), n_ctx=32)
    assert resident_pages(path) == 0
    ctx.decode(UBatch.single([5, 6, 7, 260], 0))
    for pos in range(4, 8):
        ctx.decode(UBatch.single([9 + pos], pos))
    assert resident_pages(path) == 0


HEAP_PROBE = """
import ctypes, ctypes.util, sys
from kvgraph.engine.heap import release_free_heap
libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.mallopt(-3, 64 << 20)          # M_MMAP_THRESHOLD raised, as glibc does itself after a load
def rss_kb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
blocks = [libc.malloc(8 << 20) for _ in range(3)]
for b in blocks:
    ctypes.memset(b, 1, 8 << 20)
libc.free(blocks[0])                # in the middle of the heap: free() alone cannot give them back
libc.free(blocks[1])
before = rss_kb()
trimmed = release_free_heap()
print(trimmed, before - rss_kb())
"""


@linux
def test_freed_heap_memory_goes_back_to_the_system():
    """Freed blocks in the middle of the brk heap stay resident until trimmed (what loading and compiling
    leave behind); release_free_heap hands them back. In a child process: the probe pins glibc's
    threshold, which would change this process's allocations for the tests after it."""
    if "glibc" not in " ".join(platform.libc_ver()):
        pytest.skip("glibc only")
    out = subprocess.run([sys.executable, "-c", HEAP_PROBE], capture_output=True, text=True, check=True).stdout
    trimmed, freed_kb = out.split()
    assert trimmed == "True" and int(freed_kb) > 12 << 10



def resident_bytes(a: np.ndarray) -> int:
    """Bytes of a's pages that are in memory (pagemap's present bit)."""
    lo, hi = a.ctypes.data // 4096, -(-(a.ctypes.data + a.nbytes) // 4096)
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(lo * 8)
        entries = np.frombuffer(pagemap.read((hi - lo) * 8), np.uint64)
    return int(((entries >> np.uint64(63)) & np.uint64(1)).sum()) * 4096


@linux
def test_tile_arena_hands_back_block_space_no_tile_uses():
    """With transparent huge pages the last tiles' huge page is resident whole; the arena hands back every
    page past its tiles (here touched on purpose), at a new block and once the load is done."""
    from kvgraph.backends.native.mats import TileArena

    arena = TileArena()
    tiles, block = arena.take(100, 30000)          # 3 MB of tiles in a 64 MB block
    tiles[:] = 1
    block[arena.used: arena.used + (8 << 20)] = 1  # 8 MB past them resident
    assert resident_bytes(block) >= arena.used + (8 << 20)
    arena.release_unused()
    assert resident_bytes(block) <= arena.used + 4096
    assert (tiles == 1).all()
    block[arena.used: arena.used + (1 << 20)] = 1
    arena.take(10, 64 << 20)                       # does not fit: a new block, the old one's tail handed back
    assert arena.block is not block and resident_bytes(block) <= 3_000_000 + 4096


def test_available_memory_reads_meminfo_and_the_cgroup_limit(tmp_path):
    from kvgraph.engine.heap import available_bytes

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:   8000000 kB\n")
    cg = tmp_path / "cg"
    cg.mkdir()
    assert available_bytes(str(meminfo), cg) == 8000000 * 1024                 # no cgroup files: MemAvailable
    (cg / "memory.max").write_text("max\n")
    (cg / "memory.current").write_text("100\n")
    assert available_bytes(str(meminfo), cg) == 8000000 * 1024                 # no limit
    (cg / "memory.max").write_text(f"{3 << 30}\n")
    (cg / "memory.current").write_text(f"{1 << 30}\n")
    assert available_bytes(str(meminfo), cg) == 2 << 30                        # the limit leaves less
    assert available_bytes(str(tmp_path / "none"), cg) is None


@pytest.mark.parametrize("backend", ["native", "numpy"])
def test_a_model_larger_than_the_free_memory_is_one_line_before_loading(tmp_path, monkeypatch, backend):
    """Refused up front with what it needs and what there is, never loaded into an OOM kill; the numpy
    backend's float32 weights are counted as such."""
    from kvgraph.engine import loader
    from kvgraph.errors import InsufficientMemoryError

    if backend == "native" and native.library() is None:
        pytest.skip("needs the C kernels")
    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path, TinySpec(n_layer=2, n_embd=64, n_ff=128, weight_type="Q8_0"))
    b = get_backend(backend)
    need = b.weight_bytes(loader.GGUFFile(path), loader.open_model(path)[2].shapes)
    file_bytes = path.stat().st_size
    assert (need > 3 * file_bytes) == (backend == "numpy") and need > file_bytes // 2
    monkeypatch.setattr(loader, "available_bytes", lambda: int(need * 0.9))
    with pytest.raises(InsufficientMemoryError, match=r"need about .* GB of memory .* only .* GB is available"):
        load_model(path, b)
    monkeypatch.setattr(loader, "available_bytes", lambda: int(need * 1.1))
    load_model(path, b)                                  # enough: loads
    monkeypatch.setattr(loader, "available_bytes", lambda: 1000)
    proc_err = subprocess.run([sys.executable, "-c", "import sys; from kvgraph.engine import loader; "
                               "loader.available_bytes = lambda: 1000; from kvgraph.cli.main import main; "
                               f"sys.exit(main(['generate', '-m', {str(path)!r}, '--backend', {backend!r}, 'hi']))"],
                              capture_output=True, text=True)
    assert proc_err.returncode == 1 and proc_err.stderr.count("\n") == 1
    assert proc_err.stderr.startswith("kvgraph: error: ") and "GB is available" in proc_err.stderr

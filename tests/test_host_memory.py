"""What a loaded model keeps resident: its repacked weights, not the file's pages, and no freed heap."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from kvgraph.backends import get_backend, native
from kvgraph.engine.context import Context
from kvgraph.engine.heap import return_freed_memory
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


@linux
def test_freed_buffers_go_back_to_the_system():
    if "glibc" not in " ".join(__import__("platform").libc_ver()):
        pytest.skip("glibc only")
    assert return_freed_memory() and return_freed_memory()      # applied once, then a no-op

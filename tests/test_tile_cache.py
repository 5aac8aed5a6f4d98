"""The repacked-weights cache: a later load maps the first load's tiles, with the same results; a damaged,
truncated or stale entry is detected and rebuilt, never used; concurrent first loads leave one whole entry;
a cache folder that cannot be written costs only the entry."""
from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest

from kvgraph.backends import get_backend, native
from kvgraph.backends.native import tile_cache
from kvgraph.engine.context import Context
from kvgraph.engine.loader import load_model
from kvgraph.gguf.reader import GGUFFile
from kvgraph.graph.inputs import UBatch
from tiny_models import TinySpec, write_tiny_llama

pytestmark = pytest.mark.skipif(native.library() is None, reason=f"native kernels unavailable: {native.why_not()}")

TOKENS = [5, 6, 7, 260, 9, 31]


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A private KVGRAPH_HOME, and entries kept for models of any size (these are tiny)."""
    monkeypatch.setenv("KVGRAPH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("KVGRAPH_WEIGHT_CACHE", raising=False)
    monkeypatch.setattr(tile_cache, "MIN_BYTES", 0)
    monkeypatch.setattr(tile_cache, "_warned", set())
    return tmp_path / "home"


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "tiny.gguf"
    # Q4_K (K a multiple of 256), Q8_0 and Q4_1 tiles, and a tied embedding whose output matrix is cached too
    write_tiny_llama(path, TinySpec(weight_type="Q4_1", n_embd=256, n_ff=512, n_head=4, n_head_kv=2))
    return path


def run(path) -> tuple[np.ndarray, str, str]:
    """Logits of every token of TOKENS, the tile cache's state after the load, and where tiles came from."""
    backend = get_backend("native")
    loaded = load_model(path, backend, tokenizer=False)
    ctx = Context(loaded, n_ctx=64)
    logits = np.array(ctx.decode(UBatch.single(TOKENS, 0, all_outputs=True)), copy=True)
    cache = backend.tile_cache
    return logits, (cache.state if cache else "off"), backend.weights_origin()


def entries(home) -> list:
    return tile_cache.list_entries(home / "weights")


def test_second_load_maps_the_first_loads_tiles_with_the_same_results(home, model, monkeypatch):
    first, state, origin = run(model)
    assert state == "written" and "kept in" in origin
    [entry] = entries(home)
    assert entry["source"] == str(model.resolve())
    again, state, origin = run(model)
    assert state == "hit" and origin.startswith("mapped from")
    assert np.array_equal(first, again)
    monkeypatch.setenv("KVGRAPH_WEIGHT_CACHE", "off")
    off, state, _ = run(model)
    assert state == "off" and np.array_equal(first, off)
    assert len(entries(home)) == 1


def test_every_cached_matrix_is_the_one_a_fresh_repack_makes(home, model):
    run(model)
    fresh = load_model(model, get_backend("native"), tokenizer=False)
    backend = get_backend("native")
    mapped = load_model(model, backend, tokenizer=False)
    assert backend.tile_cache.state == "hit"
    n = 0
    for name, w in mapped.weights.items():
        if w.mat is not None and hasattr(w.mat, "tiles"):
            assert np.array_equal(w.mat.tiles, fresh.weights[name].mat.tiles), name
            assert w.mat.fmt == fresh.weights[name].mat.fmt
            n += 1
    assert n >= 8


def _damage(path, at: int, size: int | None = None) -> None:
    with open(path, "r+b") as f:
        if size is not None:
            f.truncate(size)
            return
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x10]))


@pytest.mark.parametrize("damage", ["tile byte", "last tile byte", "index byte", "prefix", "truncated",
                                    "extended"])
def test_a_damaged_entry_is_never_used_but_rebuilt(home, model, damage, capfd):
    first, _, _ = run(model)
    [entry] = entries(home)
    path, size = entry["file"], entry["bytes"]
    _, _, _, index_at, n_index, data_at, n_data, _, _ = tile_cache.PREFIX.unpack_from(path.read_bytes())
    assert index_at == data_at + n_data and size == index_at + n_index
    if damage == "tile byte":
        _damage(path, data_at + n_data // 3)
    elif damage == "last tile byte":
        _damage(path, data_at + n_data - 1)
    elif damage == "index byte":
        _damage(path, index_at + n_index // 2)
    elif damage == "prefix":
        _damage(path, 0)
    elif damage == "truncated":
        _damage(path, 0, size - 1)
    else:
        with open(path, "ab") as f:
            f.write(b"\0" * 100)
    capfd.readouterr()
    again, state, _ = run(model)
    assert state == "written"                     # repacked and written again, not mapped
    assert np.array_equal(first, again)
    err = capfd.readouterr().err
    assert err.count("kvgraph: the repacked-weights cache entry") == 1 and "repacking" in err
    assert run(model)[1] == "hit"                  # the rebuilt entry is whole


def test_a_changed_source_file_gets_a_new_entry_and_the_old_one_goes(home, model):
    first, _, _ = run(model)
    [old] = entries(home)
    write_tiny_llama(model, TinySpec(weight_type="Q4_1", n_embd=256, n_ff=512, n_head=4, n_head_kv=2, seed=1))
    changed, state, _ = run(model)
    assert state == "written" and not np.array_equal(first, changed)
    [new] = entries(home)
    assert new["file"] != old["file"] and not old["file"].exists()
    assert run(model)[1] == "hit"


def test_an_entry_of_a_deleted_source_is_collected(home, model, tmp_path):
    other = tmp_path / "other.gguf"
    write_tiny_llama(other, TinySpec(weight_type="Q8_0", n_embd=256, n_ff=512, n_head=4, n_head_kv=2))
    run(other)
    run(model)
    assert {e["source"] for e in entries(home)} == {str(other.resolve()), str(model.resolve())}
    other.unlink()
    model.write_bytes(model.read_bytes())          # a new identity: the next load writes, and collects
    run(model)
    assert [e["source"] for e in entries(home)] == [str(model.resolve())]


def test_an_unwritable_cache_folder_costs_only_the_entry(tmp_path, model, monkeypatch, capfd):
    blocker = tmp_path / "home"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setenv("KVGRAPH_HOME", str(blocker))
    monkeypatch.setattr(tile_cache, "MIN_BYTES", 0)
    monkeypatch.setattr(tile_cache, "_warned", set())
    first, state, origin = run(model)
    assert state.startswith("not written") and "repacked at load" in origin
    second, _, _ = run(model)
    assert np.array_equal(first, second)
    err = capfd.readouterr().err
    assert err.count("cannot keep the repacked weights") == 1     # said once per process, not per load


@pytest.mark.parametrize("fills_after", [0, 3])
def test_a_disk_that_fills_up_leaves_no_partial_file(home, model, monkeypatch, capfd, fills_after):
    """Disk space is reserved before each matrix is packed into the entry; once that fails, the rest is
    packed into memory (the results are the same) and the entry is dropped."""
    monkeypatch.setenv("KVGRAPH_WEIGHT_CACHE", "off")
    want, _, _ = run(model)
    monkeypatch.delenv("KVGRAPH_WEIGHT_CACHE")
    calls = []
    real = os.posix_fallocate

    def fallocate(fd, offset, n):
        calls.append(n)
        if len(calls) > fills_after:
            raise OSError(28, "No space left on device")
        real(fd, offset, n)
    monkeypatch.setattr(tile_cache.os, "posix_fallocate", fallocate)
    got, state, origin = run(model)
    assert state == "not written: No space left on device" and "repacked at load" in origin
    assert np.array_equal(got, want)
    assert list((home / "weights").iterdir()) == []
    assert "No space left on device" in capfd.readouterr().err


def _load_in_child(path, home, queue):
    os.environ["KVGRAPH_HOME"] = str(home)
    tile_cache.MIN_BYTES = 0
    logits, state, _ = run(path)
    queue.put((state, logits.tobytes()))


def test_concurrent_first_loads_leave_one_whole_entry(home, model):
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_load_in_child, args=(model, home, queue)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    assert len({logits for _, logits in results}) == 1
    assert {state for state, _ in results} <= {"written", "hit"}
    assert len(entries(home)) == 1 and not list((home / "weights").glob("*.tmp"))
    logits, state, _ = run(model)
    assert state == "hit" and logits.tobytes() == results[0][1]


def test_the_checksum_is_the_same_on_every_build_and_thread_count(monkeypatch):
    data = np.random.default_rng(0).integers(0, 256, (5 << 20) + 77, dtype=np.uint8)
    sums = set()
    for isa in native.runnable_isas():
        monkeypatch.setattr(native, "_lib", native.build(isa))
        for threads in (1, 2, 3):
            native.set_threads(threads)
            sums.add(native.checksum(data))
    native.set_threads(2)
    assert len(sums) == 1
    data[len(data) // 2] ^= 1
    assert native.checksum(data) not in sums
    assert native.checksum(data[:100]) != native.checksum(data[:101])


def test_models_command_lists_the_entries_and_clears_them(home, model, capsys):
    from kvgraph.cli.main import main

    run(model)
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "repacked weights" in out and "1 entry" in out and "--clear-cache" in out and model.name in out
    assert main(["models", "--clear-cache"]) == 0
    assert "deleted 1 repacked-weights entry" in capsys.readouterr().out
    assert entries(home) == [] and run(model)[1] == "written"


def test_a_mixtures_experts_are_kept_and_mapped_like_any_matrix(home):
    """A quantized mixture of experts (Jamba's llama-quantize Q8_0 fixture): the experts' stacked tiles go into
    the entry with the other matrices -- the second load maps them, nothing is packed again -- with the same
    logits."""
    path = Path(__file__).parent / "data" / "arch" / "quant" / "jamba.Q8_0.gguf"
    first, state, _ = run(path)
    assert state == "written"
    backend = get_backend("native")
    load_model(path, backend, tokenizer=False)
    cache = backend.tile_cache
    experts = [n for n in GGUFFile(path).tensors if "_exps." in n]
    assert cache.state == "hit" and experts and all(cache.lookup(n) is not None for n in experts)
    kept = sum(w.mat.tiles.nbytes for w in load_model(path, get_backend("native"), tokenizer=False).weights.values()
               if hasattr(w.mat, "tiles"))
    assert tile_cache.largest_tiles(GGUFFile(path)) >= kept     # the space a writer reserves covers them
    again, state, _ = run(path)
    assert state == "hit" and np.array_equal(first, again)

"""kvgraph's C kernels (kvgraph/backends/native) against plain numpy: activation quantization bit for bit,
integer-dot matmuls exactly up to float rounding, and the weight repacking of every GGUF type."""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from kvgraph.backends import native
from kvgraph.backends.native import QK, bind, pack_q4, pack_q5, pack_q8, ptr, quantize_blocks_q8
from kvgraph.backends.native import ops as native_ops
from kvgraph.backends.native.mats import NativeMat, Q8Act
from kvgraph.backends import reference
from kvgraph.backends.quant_repack import Q8_0Rows
from kvgraph.backends.reference import Q8_0_BLOCK
from kvgraph.errors import InvalidArgumentError

pytestmark = pytest.mark.skipif(native.library() is None, reason=f"native kernels unavailable: {native.why_not()}")
RNG = np.random.default_rng(7)
Q = gguf.GGMLQuantizationType


@pytest.fixture(params=native.runnable_isas())
def variant(request, monkeypatch):
    """Each build of the kernels this CPU runs (AVX-512 VNNI, AVX2, portable C), in turn: an AVX-512 machine
    tests the AVX2 and portable builds too, and an AVX2 one lists no AVX-512 cases it cannot run."""
    monkeypatch.setattr(native, "_lib", native.build(request.param))
    assert native.isa_of(native.library()) == request.param
    return request.param


def quantize_ref(x: np.ndarray):
    """ggml's Q8_1 activation quantization in numpy float32: d = max|x| / 127, q = rint(x * 127 / max|x|)."""
    m, k = x.shape
    b = x.reshape(m, k // QK, QK)
    amax = np.abs(b).max(2)
    d = amax / np.float32(127)
    inv = np.divide(np.float32(127), amax, out=np.zeros_like(amax), where=amax > 0)
    q = np.rint(b * inv[..., None]).astype(np.int8)
    return q.reshape(m, k), d, d * q.astype(np.int32).sum(2).astype(np.float32)


def quantized(x: np.ndarray) -> Q8Act:
    act = Q8Act(*x.shape)
    act.quantize_kernel(x)()
    return act


@pytest.mark.parametrize("k", [32, 96, 576])
def test_activation_quantization_is_bit_identical_to_numpy(k, variant):
    x = RNG.standard_normal((5, k), dtype=np.float32) * RNG.uniform(0.01, 10, (5, 1)).astype(np.float32)
    x[1, :QK] = 0                                   # an all-zero block: d = 0, q = 0
    act = quantized(x)
    q, d, s = quantize_ref(x)
    np.testing.assert_array_equal(act.q, q)
    np.testing.assert_array_equal(act.d, d)
    np.testing.assert_allclose(act.s, s, rtol=1e-6)
    np.testing.assert_array_equal(act.h, q.reshape(5, -1, 16).astype(np.int32).sum(2))


def test_quantization_reads_strided_rows():
    big = RNG.standard_normal((3, 128), dtype=np.float32)
    act = Q8Act(3, 64)
    act.quantize_kernel(big[:, 32:96])()
    np.testing.assert_array_equal(act.q, quantize_ref(np.ascontiguousarray(big[:, 32:96]))[0])


def matmul_ref(w: np.ndarray, act: Q8Act) -> np.ndarray:
    """The exact product of the dequantized weight with the dequantized activation, in float64."""
    x = act.q.astype(np.float64).reshape(act.m, -1, QK) * act.d.astype(np.float64)[..., None]
    return x.reshape(act.m, -1) @ w.astype(np.float64).T


def random_q4(n: int, k: int, half: bool, levels: int = 16):
    q = RNG.integers(0, levels, (n, k), dtype=np.uint8)
    d = RNG.uniform(0.001, 0.02, (n, k // QK)).astype(np.float32)
    m = -8 * d * RNG.uniform(0.5, 1.5, d.shape).astype(np.float32)
    if half:
        d, m = d.astype(np.float16).astype(np.float32), m.astype(np.float16).astype(np.float32)
    w = q * np.repeat(d, QK, 1).astype(np.float64) + np.repeat(m, QK, 1)
    return (pack_q5(q, d, m) if levels == 32 else pack_q4(q, d, m, half)), w


@pytest.mark.parametrize("fmt", ["q4h", "q4", "q5h", "q8"])
@pytest.mark.parametrize("n, k, m", [(1, 32, 1), (67, 96, 1), (64, 576, 5), (13, 256, 9), (8, 64, 4)])
def test_matmul_equals_the_exact_product_of_dequantized_operands(fmt, n, k, m, variant):
    """Rows not a multiple of the 16-row tile (zero-padded), activation rows not a multiple of the 4-row
    pass, odd group counts (96 = 3 groups) and extreme int8 values (Q8's +128 offset) all give the exact
    product."""
    if fmt == "q8":
        qw, d = quantize_blocks_q8(RNG.standard_normal((n, k), dtype=np.float32))
        qw[0, :QK] = 127
        qw[-1, -QK:] = -127
        rows, w = pack_q8(qw, d), qw.astype(np.float64) * np.repeat(d.astype(np.float64), QK, 1)
    else:
        rows, w = random_q4(n, k, half=fmt != "q4", levels=32 if fmt == "q5h" else 16)
    x = RNG.standard_normal((m, k), dtype=np.float32)
    x[0, :QK] = 3.0                       # a block of all +127 and one of all -127
    x[-1, -QK:] = -3.0
    act = quantized(x)
    y = np.full((m, n), np.nan, np.float32)
    ends, outs = np.array([n], np.int64), np.array([ptr(y)], np.int64)
    bind(f"kvg_matmul_{fmt}", ptr(rows), n, k, ptr(act.q), ptr(act.d), ptr(act.s), m, 1, ptr(ends), ptr(outs),
         rows.strides[0], ptr(act.h))()
    ref = matmul_ref(w, act)
    np.testing.assert_allclose(y, ref, rtol=2e-5, atol=2e-5 * np.abs(ref).max())


def test_split_matmul_writes_each_member_into_its_own_buffer(variant):
    rows, w = random_q4(58, 64, half=True)
    act = quantized(RNG.standard_normal((3, 64), dtype=np.float32))
    outs = [np.zeros((3, 16), np.float32), np.zeros((3, 32), np.float32), np.zeros((3, 10), np.float32)]
    ends = np.array([16, 48, 58], np.int64)
    ptrs = np.array([ptr(o) for o in outs], np.int64)
    bind("kvg_matmul_q4h", ptr(rows), 58, 64, ptr(act.q), ptr(act.d), ptr(act.s), 3, 3, ptr(ends), ptr(ptrs),
         rows.strides[0], ptr(act.h))()
    np.testing.assert_allclose(np.concatenate(outs, 1), matmul_ref(w, act), rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("type_name", ["Q4_K", "Q5_K", "Q6_K"])
@pytest.mark.parametrize("n, k, m", [(1, 256, 1), (67, 512, 5), (16, 256, 4)])
def test_kquant_matmuls_in_the_files_own_numbers_equal_the_exact_product(type_name, n, k, m, variant):
    raw = gguf_matrix(type_name, n, k)
    mat = NativeMat(raw, type_name, (n, k))
    w = gguf.quants.dequantize(raw, Q[type_name]).astype(np.float64).reshape(n, k)
    x = RNG.standard_normal((m, k), dtype=np.float32)
    act = quantized(x)
    y = np.full((m, n), np.nan, np.float32)
    mat.kernel(act, y)()
    ref = matmul_ref(w, act)
    np.testing.assert_allclose(y, ref, rtol=2e-5, atol=2e-5 * np.abs(ref).max())


EXACT = ["Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0"]


KQUANT_BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}


def gguf_matrix(type_name: str, n: int, k: int) -> np.ndarray:
    if type_name in KQUANT_BYTES:          # gguf cannot quantize k-quants: random blocks with sane scales
        rows = np.frombuffer(RNG.bytes(n * (k // 256) * KQUANT_BYTES[type_name]), np.uint8)
        rows = rows.reshape(n, k // 256, -1).copy()
        at = 208 if type_name == "Q6_K" else 0
        rows[..., at: at + 2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
        if type_name != "Q6_K":
            rows[..., 2:4] = np.frombuffer(np.float16(0.005).tobytes(), np.uint8)
        return rows.reshape(n, -1)
    return gguf.quants.quantize(RNG.standard_normal((n, k), dtype=np.float32), Q[type_name])


@pytest.mark.parametrize("type_name", EXACT + ["F16"])
def test_repacked_weights_are_gguf_exact_or_within_half_an_int8_step(type_name):
    n, k = 48, 256
    raw = gguf_matrix(type_name, n, k)
    ref = gguf.quants.dequantize(raw, Q[type_name]).astype(np.float32).reshape(n, k)
    mat = NativeMat(raw, type_name, (n, k))
    got = mat.dequantize()
    if type_name in EXACT:
        np.testing.assert_array_equal(got, ref)
    else:
        step = np.abs(ref.reshape(n, -1, QK)).max(2, keepdims=True) / 127
        assert np.all(np.abs(got - ref).reshape(n, -1, QK) <= step * 0.5 * (1 + 2 ** -10) + 1e-12)


@pytest.mark.parametrize("type_name", EXACT)
def test_rows_read_back_out_of_tiles_are_bit_identical_to_gguf(type_name, variant):
    """A tied embedding's lookup reads its rows out of the output matrix's tiles (no file pages touched)."""
    n, k = 37, 512                                       # a partial last tile
    raw = gguf_matrix(type_name, n, k)
    mat = NativeMat(raw, type_name, (n, k))
    ids = np.array([0, 36, 5, 16, 15, 36], np.int32)
    out = np.full((len(ids), k), np.nan, np.float32)
    mat.rows_kernel(ids, out)()
    np.testing.assert_array_equal(out, gguf.quants.dequantize(raw, Q[type_name]).reshape(n, k)[ids])


def test_rows_of_requantized_tiles_are_not_read_back_and_bad_ids_are_refused():
    from kvgraph.errors import IndexOutOfRangeError

    out = np.empty((1, 64), np.float32)
    assert NativeMat(gguf_matrix("F16", 16, 64), "F16", (16, 64)).rows_kernel(np.zeros(1, np.int32), out) is None
    mat = NativeMat(gguf_matrix("Q8_0", 16, 64), "Q8_0", (16, 64))
    with pytest.raises(IndexOutOfRangeError):
        mat.rows_kernel(np.array([16], np.int32), out)()
    assert native.library().kvg_take_bad_indices() == 0


def test_matrices_loaded_end_to_end_stack_without_a_copy_and_others_are_copied(variant):
    from kvgraph.backends.native.mats import TileArena

    arena, k = TileArena(), 256
    raws = [gguf_matrix("Q4_K", n, k) for n in (32, 16, 48)]
    mats = [NativeMat(r, "Q4_K", (r.shape[0], k), arena) for r in raws]
    loose = [NativeMat(r, "Q4_K", (r.shape[0], k)) for r in raws]         # no arena: separate arrays
    x = quantized(RNG.standard_normal((3, k), dtype=np.float32))
    for group, shared in ((mats, True), (loose, False), ([mats[0], mats[2]], False), ([mats[1], mats[0]], False)):
        before, addrs = [m.tiles.copy() for m in group], [m.tiles.ctypes.data for m in group]
        fused = NativeMat.fuse(group)
        assert (fused.tiles.ctypes.data == addrs[0]) == shared                 # a view of them, or a new stack
        assert [m.tiles.ctypes.data for m in group] == addrs or not shared
        outs = [np.empty((3, m.n), np.float32) for m in group]
        fused.kernel_split(x, outs)()
        for m, t, out in zip(group, before, outs):
            np.testing.assert_array_equal(m.tiles, t)
            alone = np.empty((3, m.n), np.float32)
            m.kernel(x, alone)()
            np.testing.assert_array_equal(out, alone)


def test_scales_are_stored_as_float16_exactly_when_that_loses_nothing():
    q41 = NativeMat(gguf_matrix("Q4_1", 16, 64), "Q4_1", (16, 64))
    assert q41.fmt == "q4h" and q41.nbytes == 16 * 64 * 20 // 32        # the file's own 20 bytes per block
    for t, fmt, row_bytes in [("Q4_K", "q4k", 148), ("Q5_K", "q5k", 180), ("Q6_K", "q6k", 210)]:
        mat = NativeMat(gguf_matrix(t, 16, 512), t, (16, 512))         # the file's numbers: 144 / 176 / 210 per 256
        assert mat.fmt == fmt and mat.nbytes == 16 * 2 * row_bytes
    q8 = NativeMat(gguf_matrix("Q8_0", 16, 64), "Q8_0", (16, 64))
    assert q8.fmt == "q8" and q8.nbytes == 16 * 64 * 34 // 32
    q5 = NativeMat(gguf_matrix("Q5_0", 16, 64), "Q5_0", (16, 64))
    assert q5.fmt == "q5h" and q5.nbytes == 16 * 64 * 24 // 32         # the file's 22 + 2 for m = -16 d
    assert NativeMat(gguf_matrix("Q4_1", 17, 64), "Q4_1", (17, 64)).nbytes == 32 * 64 * 20 // 32  # padded tile


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_tiles_moved_from_the_files_bytes_equal_tiles_packed_from_decoded_values(type_name):
    from kvgraph.backends.native import pack_blocks
    from kvgraph.backends.quant_repack import int4_blocks

    raw = gguf_matrix(type_name, 32, 96)
    if type_name == "Q8_0":
        blocks = raw.reshape(32, 3, 34)
        want = pack_q8(np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(32, 96),
                       blocks[..., :2].copy().view(np.float16)[..., 0])
    else:
        _, q, d, m = next(int4_blocks(raw, type_name))
        want = pack_q5(q, d, m) if type_name.startswith("Q5") else pack_q4(q, d, m, half=True)
    np.testing.assert_array_equal(pack_blocks(raw, type_name), want)


def test_a_scale_whose_offset_is_no_float16_keeps_float32_scales_or_goes_to_q8():
    raw = gguf_matrix("Q4_0", 16, 64).reshape(16, 2, 18)
    raw[0, 0, :2] = np.frombuffer(np.float16(20000).tobytes(), np.uint8)      # -8 d = -160000: no float16
    mat = NativeMat(raw.reshape(16, -1), "Q4_0", (16, 64))
    assert mat.fmt == "q4"
    np.testing.assert_array_equal(mat.dequantize(), gguf.quants.dequantize(raw.reshape(16, -1), Q.Q4_0).reshape(16, 64))
    rows = np.empty((16, 64), np.float32)                                    # and rows read back out of them
    mat.rows_kernel(np.arange(16, dtype=np.int32), rows)()
    np.testing.assert_array_equal(rows, mat.dequantize())
    raw5 = gguf_matrix("Q5_0", 16, 64).reshape(16, 2, 22)
    raw5[0, 0, :2] = np.frombuffer(np.float16(8000).tobytes(), np.uint8)      # -16 d: no float16 either
    assert NativeMat(raw5.reshape(16, -1), "Q5_0", (16, 64)).fmt == "q8"    # re-quantized instead


def test_stacked_matrices_share_rows_with_their_members():
    mats = [NativeMat(gguf_matrix("Q4_0", n, 64), "Q4_0", (n, 64)) for n in (16, 48)]
    before = [m.dequantize() for m in mats]
    assert NativeMat.can_fuse(mats) and not NativeMat.can_fuse(mats + [NativeMat(gguf_matrix("Q4_0", 8, 64),
                                                                                 "Q4_0", (8, 64))])
    fused = NativeMat.fuse(mats)
    np.testing.assert_array_equal(fused.dequantize(), np.concatenate(before))
    assert all(np.shares_memory(m.tiles, fused.tiles) for m in mats)
    np.testing.assert_array_equal(mats[1].dequantize(), before[1])


def test_disabled_by_environment_variable(monkeypatch):
    monkeypatch.setenv("KVGRAPH_NATIVE", "0")
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_why_not", None)
    assert native.library() is None and "KVGRAPH_NATIVE=0" in native.why_not()


def test_a_broken_compiler_falls_back_with_one_line_saying_why(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("CC", "false")                     # a "compiler" that always fails
    monkeypatch.setenv("KVGRAPH_HOME", str(tmp_path))
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_why_not", None)
    assert native.library() is None
    assert "could not build the native kernels" in native.why_not()
    assert "falling back to torch's kernels" in capsys.readouterr().err


def test_kernels_give_the_same_bits_on_any_number_of_threads_and_from_two_callers_at_once(variant):
    """The pool shares a kernel's items (matmul tiles, attention tasks) among however many threads run, and a
    second Python thread calling while the pool is busy runs its kernel on its own thread: each item is
    computed whole by one thread, so every split gives the same bits."""
    import threading

    rows, _ = random_q4(300, 256, half=True)
    act = quantized(RNG.standard_normal((6, 256), dtype=np.float32))
    n, nh, nhkv, d, n_kv = 19, 8, 2, 32, 1024
    q, k, v = (RNG.standard_normal(s, dtype=np.float32) for s in ((n, nh, d), (n_kv, nhkv, d), (n_kv, nhkv, d)))
    mask = np.where(np.arange(n_kv)[None, :] <= np.arange(n)[:, None] + 700, 0, -np.inf).astype(np.float32)
    pages = np.array([2, 0, 3, 1], np.int32)

    def kernels():
        """A matmul and an attention kernel writing buffers of their own; run() gives their outputs."""
        y, o = np.empty((6, 300), np.float32), np.empty((n, nh, d), np.float32)
        ends, outs = np.array([300], np.int64), np.array([ptr(y)], np.int64)
        matmul = bind("kvg_matmul_q4h", ptr(rows), 300, 256, ptr(act.q), ptr(act.d), ptr(act.s), 6, 1, ptr(ends),
                      ptr(outs), rows.strides[0], ptr(act.h), keep=(ends, outs))
        attention = native_ops.attention(q, k, v, mask, 0.2, o, pages)

        def run():
            matmul()
            attention()
            return y.copy(), o.copy()
        return run

    try:
        native.set_threads(1)
        run = kernels()
        ref = run()
        for threads in (2, 3, 5):
            native.set_threads(threads)
            assert native.library().kvg_threads() == threads
            for _ in range(3):
                got = run()
                np.testing.assert_array_equal(got[0], ref[0])
                np.testing.assert_array_equal(got[1], ref[1])
        results, errors = [], []

        def caller():
            try:
                mine = kernels()
                for _ in range(20):
                    results.append(mine())
            except Exception as exc:                  # pragma: no cover - reported below
                errors.append(exc)

        callers = [threading.Thread(target=caller) for _ in range(2)]
        for c in callers:
            c.start()
        for c in callers:
            c.join(timeout=120)
        assert not errors and len(results) == 40
        for got in results:
            np.testing.assert_array_equal(got[0], ref[0])
            np.testing.assert_array_equal(got[1], ref[1])
    finally:
        native.set_threads(2)


def test_attention_merges_a_sequences_pages_in_block_order_wherever_they_lie(variant):
    """The same keys and values in pages laid out in another order (a sequence batched with others, or
    continued in pages freed by others) give the same bits when each page's block is given."""
    n, nh, nhkv, d, page = 3, 4, 2, 16, 256
    blocks, rng = 3, np.random.default_rng(11)         # its own numbers: the last assertion checks a rounding
    q = rng.standard_normal((n, nh, d), dtype=np.float32)
    k = rng.standard_normal((blocks * page, nhkv, d), dtype=np.float32) * 3
    v = rng.standard_normal((blocks * page, nhkv, d), dtype=np.float32)
    mask = np.zeros((n, blocks * page), np.float32)
    mask[:, -40:] = -np.inf                         # the last block is partly filled
    mask[0, 100:] = -np.inf
    ref = np.empty((n, nh, d), np.float32)
    native_ops.attention(q, k, v, mask, 0.3, ref, np.arange(blocks, dtype=np.int32))()
    layout = [4, 1, 2]                              # block b lies in page layout[b] of a five-page window
    k5, v5 = (np.full((5 * page, nhkv, d), np.nan, np.float32) for _ in range(2))
    m5 = np.full((n, 5 * page), -np.inf, np.float32)
    pages = np.full(5, -1, np.int32)
    for b, p in enumerate(layout):
        cells, at = slice(b * page, b * page + page), slice(p * page, p * page + page)
        k5[at], v5[at], m5[:, at], pages[p] = k[cells], v[cells], mask[:, cells], b
    got = np.empty_like(ref)
    native_ops.attention(q, k5, v5, m5, 0.3, got, pages)()
    np.testing.assert_array_equal(got, ref)
    native_ops.attention(q, k5, v5, m5, 0.3, got)()       # window order: the blocks merged 1, 2, 0
    assert not np.array_equal(got, ref)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_the_best_build_the_cpu_runs_is_loaded_and_never_one_it_does_not(monkeypatch, tmp_path, capsys):
    """Each instruction set is its own build (cached apart); the CPU probe picks the best one it runs, and
    KVGRAPH_ISA may pick a lower one but never one the CPU lacks."""
    monkeypatch.setenv("KVGRAPH_HOME", str(tmp_path))
    monkeypatch.delenv("KVGRAPH_ISA", raising=False)
    cc = native._compiler()
    paths = {isa: native._build(cc, native.FLAGS + native.ISA_FLAGS[isa]) for isa in ("portable", "avx2")}
    assert paths["portable"] != paths["avx2"] and all(p.exists() for p in paths.values())

    def fresh(level):
        monkeypatch.setattr(native, "_lib", None)
        monkeypatch.setattr(native, "_why_not", None)
        monkeypatch.setattr(native, "_level", level)
        return native.library()

    if native.cpu_level() >= 1:            # a CPU without AVX-512: the AVX2 build
        assert native.isa_of(fresh(1)) == "avx2"
    assert native.isa_of(fresh(0)) == "portable"
    monkeypatch.setenv("KVGRAPH_ISA", "avx512")
    with pytest.raises(InvalidArgumentError, match="does not run AVX-512 VNNI: this CPU runs portable, avx2; set "
                                                   "KVGRAPH_ISA to one of those or to auto"):
        fresh(1)
    monkeypatch.setenv("KVGRAPH_ISA", "portable")
    assert native.isa_of(fresh(2)) == "portable"
    monkeypatch.setenv("KVGRAPH_ISA", "sse9")
    with pytest.raises(InvalidArgumentError, match=r"'sse9' is not a build of the C kernels \(portable, avx2, avx512\): "
                                                   "this CPU runs portable, avx2, avx512"):
        fresh(2)


def test_a_bad_kvgraph_isa_is_one_line_from_the_cli(tiny_llama):
    import os
    import subprocess
    import sys
    env = dict(os.environ, KVGRAPH_ISA="sse9")
    r = subprocess.run([sys.executable, "-m", "kvgraph.cli.main", "generate", "-m", str(tiny_llama[0]), "-n", "1", "hi"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("kvgraph: error: KVGRAPH_ISA='sse9' is not a build")
    assert "this CPU runs portable" in r.stderr


def test_rms_norm_with_and_without_weight(variant):
    x, w = RNG.standard_normal((3, 40), dtype=np.float32), RNG.standard_normal(40, dtype=np.float32)
    ref = x / np.sqrt((x.astype(np.float64) ** 2).mean(1, keepdims=True) + 1e-5)
    for weight, expect in ((w, ref * w), (None, ref)):
        out = np.empty_like(x)
        native_ops.rms_norm(x, weight, 1e-5, out)()
        np.testing.assert_allclose(out, expect, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["swiglu", "geglu"])
def test_gated_activations(kind, variant):
    g, u = RNG.standard_normal(45, dtype=np.float32) * 4, RNG.standard_normal(45, dtype=np.float32)  # 16+16+8+5
    g[0], g[1] = -100, 100                                             # saturated ends
    g64 = g.astype(np.float64)
    act = g64 / (1 + np.exp(-g64)) if kind == "swiglu" else \
        0.5 * g64 * (1 + np.tanh(np.sqrt(2 / np.pi) * (g64 + 0.044715 * g64 ** 3)))
    out = np.empty_like(g)
    native_ops.gated(kind, g, u, out)()
    np.testing.assert_allclose(out, act * u, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["sigmoid", "softplus"])
def test_sigmoid_and_softplus_by_rows_of_a_strided_slice(kind, variant):
    """kvg_act's sigmoid and softplus on the second half of each head of [n, H, 2 d] (rows evenly spaced, as
    Qwen3-Next's attention gate is sliced), against float64; the other half untouched; each row's bits the
    same as its row alone."""
    x = RNG.standard_normal((3, 4, 2 * 21), dtype=np.float32) * 8
    x[0, 0, 21], x[0, 0, 22] = -100, 100
    src = x[:, :, 21:]
    out = np.full((3, 4, 2 * 21), 7.0, np.float32)
    native_ops.act(kind, src, out[:, :, 21:])()
    x64 = src.astype(np.float64)
    want = 1 / (1 + np.exp(-x64)) if kind == "sigmoid" else np.logaddexp(x64, 0)
    np.testing.assert_allclose(out[:, :, 21:], want, rtol=2e-6, atol=1e-6)
    assert (out[:, :, :21] == 7.0).all()
    one = np.empty((1, 21), np.float32)
    native_ops.act(kind, np.ascontiguousarray(src[2, 3:4]), one)()
    np.testing.assert_array_equal(one[0], out[2, 3, 21:])


@pytest.mark.parametrize("neox", [False, True])
def test_rope_rotates_pairs_or_halves_and_copies_the_rest(neox, variant):
    n, h, d, nd = 3, 2, 12, 8
    x, pos = RNG.standard_normal((n, h, d), dtype=np.float32), np.array([0, 7, 1000], np.int32)
    inv = 1.0 / 10000 ** (np.arange(nd // 2) * 2 / nd)
    out = np.empty_like(x)
    native_ops.rope(x, pos, out, nd, inv, neox)()
    th = pos[:, None, None] * inv.astype(np.float32)[None, None, :]
    i0, i1 = (np.arange(nd // 2), np.arange(nd // 2) + nd // 2) if neox else (np.arange(0, nd, 2), np.arange(1, nd, 2))
    ref = x.astype(np.float64).copy()
    ref[..., i0] = x[..., i0] * np.cos(th) - x[..., i1] * np.sin(th)
    ref[..., i1] = x[..., i0] * np.sin(th) + x[..., i1] * np.cos(th)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n, n_kv, dv", [(2, 7, 16), (19, 150, 24), (3, 700, 40)])
def test_attention_skips_masked_cells_and_groups_heads(n, n_kv, dv, variant):
    """One token at a time (decode) and blocks of tokens against chunks of cells (prompts: 19 tokens = a
    block of 16 and a partial one, 150 cells = two chunks of 64 and a partial one, the middle chunk hidden
    from every token; 700 cells = three segments merged, cells 256-511 hidden: one segment empty)."""
    nh, nhkv, d = 4, 2, 16
    q, k = (RNG.standard_normal(s, dtype=np.float32) for s in ((n, nh, d), (n_kv, nhkv, d)))
    v = RNG.standard_normal((n_kv, nhkv, dv), dtype=np.float32)
    mask = np.where(RNG.random((n, n_kv)) < 0.3, -np.inf, 0).astype(np.float32)
    mask[:, 1] = 0                       # every token sees at least cell 1
    mask[0, 3:] = -np.inf
    mask[1, [0, 5]] = -np.inf
    mask[:, 5] = -np.inf
    mask[:, 64:128] = -np.inf
    if n_kv > 512:
        mask[:, 256:512] = -np.inf
    k[5] = np.nan                        # a cell masked for every token: its garbage never reaches the result
    v[5] = np.nan
    out = np.empty((n, nh, dv), np.float32)
    native_ops.attention(q, k, v, mask, 0.25, out)()
    for t in range(n):
        for h in range(nh):
            valid = np.isfinite(mask[t])
            kk, vv = k[valid, h // 2].astype(np.float64), v[valid, h // 2]
            s = kk @ q[t, h] * 0.25
            p = np.exp(s - s.max())
            np.testing.assert_allclose(out[t, h], p @ vv / p.sum(), rtol=1e-5, atol=1e-5)


def test_attention_of_a_token_does_not_depend_on_its_ubatch(variant):
    """A prompt run in one ubatch and the same tokens run one by one (a prompt continued from cached cells)
    give bit-identical outputs."""
    n, nh, nhkv, d, n_kv = 21, 6, 2, 32, 600
    q, k, v = (RNG.standard_normal(s, dtype=np.float32) for s in ((n, nh, d), (n_kv, nhkv, d), (n_kv, nhkv, d)))
    mask = np.where(np.arange(n_kv)[None, :] <= np.arange(n)[:, None] + n_kv - n, 0, -np.inf).astype(np.float32)
    whole = np.empty((n, nh, d), np.float32)
    native_ops.attention(q, k, v, mask, 0.2, whole)()
    for t in range(n):
        one = np.empty((1, nh, d), np.float32)
        native_ops.attention(q[t: t + 1], k, v, mask[t: t + 1], 0.2, one)()
        np.testing.assert_array_equal(one[0], whole[t])


def test_set_rows_writes_rows_columns_and_column_ranges(variant):
    src, idx = RNG.standard_normal((2, 3), dtype=np.float32), np.array([4, 1], np.int32)
    rows, cols, wide = np.zeros((6, 3), np.float32), np.zeros((3, 6), np.float32), np.zeros((6, 7), np.float32)
    native_ops.set_rows(rows, src, idx, False, 0)()
    native_ops.set_rows(cols, src, idx, True, 0)()
    native_ops.set_rows(wide, src, idx, False, 2)()
    np.testing.assert_array_equal(rows[idx], src)
    np.testing.assert_array_equal(cols[:, idx], src.T)
    np.testing.assert_array_equal(wide[idx, 2:5], src)
    assert np.count_nonzero(wide) == np.count_nonzero(src)


def test_float16_cache_writes_round_as_numpy_does(variant):
    """A float16 KV cache row is numpy's float16 of the float32 row, bit for bit: ties to even, subnormals,
    overflow to infinity, signed zeros."""
    edge = np.array([0.0, -0.0, 1.0, 65504.0, 65519.0, 65520.0, -1e6, 6.1e-5, 5.96e-8, 2.98e-8, 1e-9,
                     1.00048828125, 1.0009765625 + 2 ** -12, 3.14159, -2.71828, 1e-4], np.float32)
    src = np.concatenate([edge, RNG.standard_normal(48).astype(np.float32) * 100]).reshape(4, 16)
    idx = np.array([2, 0, 5, 3], np.int32)
    for transposed in (False, True):
        dst = np.zeros((16, 6) if transposed else (6, 16), np.float16)
        native_ops.set_rows(dst, src, idx, transposed, 0)()
        got = dst[:, idx].T if transposed else dst[idx]
        with np.errstate(over="ignore"):
            want = src.astype(np.float16)
        np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))


def test_attention_over_a_float16_cache_equals_float32_over_the_same_values(variant):
    n, nh, nhkv, d, n_kv = 5, 4, 2, 24, 70
    q = RNG.standard_normal((n, nh, d), dtype=np.float32)
    k, v = (RNG.standard_normal((n_kv, nhkv, d)).astype(np.float16) for _ in range(2))
    mask = np.where(RNG.random((n, n_kv)) < 0.2, -np.inf, 0).astype(np.float32)
    half, single = np.empty((n, nh, d), np.float32), np.empty((n, nh, d), np.float32)
    native_ops.attention(q, k, v, mask, 0.3, half)()
    native_ops.attention(q, k.astype(np.float32), v.astype(np.float32), mask, 0.3, single)()
    np.testing.assert_array_equal(half, single)


def test_q8_0_cache_writes_are_ggml_quantize_row_q8_0_ref_bit_for_bit(variant):
    """A q8_0 KV cache row is ggml's Q8_0 of the float32 row (gguf-py's quantize, which follows
    quantize_row_q8_0_ref): d = max|x| / 127 as float16, q = x / d rounded half away from zero; an all-zero
    block has d = 0."""
    src = RNG.standard_normal((4, 96), dtype=np.float32) * 10
    src[0, :32] = 0.0
    src[1, 32:64] = np.arange(-16, 16, dtype=np.float32) + 0.5      # amax 15.5: ties of x / d at every step
    src[1, 32] = 127.0                                               # d = 1: q = x, ties at .5
    src[2, 64:] = 1e-30
    dst = np.zeros((6, 3), Q8_0_BLOCK)
    idx = np.array([2, 0, 5, 3], np.int32)
    native_ops.set_rows(dst, src, idx, False, 0)()
    want = gguf.quants.quantize(src, Q.Q8_0)
    np.testing.assert_array_equal(dst[idx].view(np.uint8).reshape(4, -1), want)
    assert dst[1].tobytes() == bytes(dst[1].nbytes) and dst[4].tobytes() == bytes(dst[4].nbytes)
    assert reference.quantize_q8_0(src).tobytes() == want.tobytes()        # the numpy backend's writes too
    assert native_ops.set_rows(dst, src[:, :40], idx, False, 0) is None   # not whole rows: the reference's


def _attention_q8_0_expected(q, kb, vb, mask, scale):
    """What the q8_0 kernel computes, in float64: scores of the query quantized as activations are (d_q d_k
    times the integer dot of each block) against the stored blocks, softmax, times the dequantized V."""
    n, nh, d = q.shape
    nhkv, g = kb.shape[1], nh // kb.shape[1]
    qq, qd, _ = quantize_ref(q.reshape(n * nh, d))
    qv = (qq.reshape(n * nh, d // QK, QK).astype(np.float64) * qd[..., None]).reshape(n, nh, d)
    with np.errstate(invalid="ignore"):           # a masked cell's garbage scale
        k, v = (reference.dequantize_q8_0(b).astype(np.float64) for b in (kb, vb))
    out = np.zeros((n, nh, v.shape[2]))
    for t in range(n):
        for h in range(nh):
            valid = np.isfinite(mask[t])
            if valid.any():
                s = k[valid, h // g] @ qv[t, h] * scale
                p = np.exp(s - s.max())
                out[t, h] = p @ v[valid, h // g] / p.sum()
    return out


@pytest.mark.parametrize("n, nh, nhkv, d, dv, n_kv", [(1, 8, 2, 64, 64, 700), (19, 4, 2, 32, 32, 150),
                                                      (5, 6, 3, 128, 96, 300), (3, 4, 4, 64, 64, 40)])
def test_attention_over_a_q8_0_cache_scores_with_integer_dots(n, nh, nhkv, d, dv, n_kv, variant):
    """q8_0 K and V (ggml's blocks): the query quantized to int8 blocks, integer dot products, V
    dequantized block by block -- the exact result of those numbers up to float32 rounding, on every build;
    masked cells (garbage in them too) never reach it, and a token's result does not depend on its ubatch."""
    q = RNG.standard_normal((n, nh, d), dtype=np.float32)
    kb = reference.quantize_q8_0(RNG.standard_normal((n_kv, nhkv, d), dtype=np.float32))
    vb = reference.quantize_q8_0(RNG.standard_normal((n_kv, nhkv, dv), dtype=np.float32))
    mask = np.where(RNG.random((n, n_kv)) < 0.3, -np.inf, 0).astype(np.float32)
    mask[:, 1] = 0
    mask[:, 5] = -np.inf
    mask[:, 64:128] = -np.inf
    kb[5]["d"], vb[5]["d"] = np.float16(np.nan), np.float16(np.inf)
    out = np.empty((n, nh, dv), np.float32)
    kernel = native_ops.attention(q, kb, vb, mask, 0.2, out)
    assert kernel is not None
    kernel()
    np.testing.assert_allclose(out, _attention_q8_0_expected(q, kb, vb, mask, 0.2), rtol=2e-5, atol=2e-5)
    for t in range(n):
        one = np.empty((1, nh, dv), np.float32)
        native_ops.attention(q[t: t + 1], kb, vb, mask[t: t + 1], 0.2, one)()
        np.testing.assert_array_equal(one[0], out[t])


def test_attention_over_q8_0_is_close_to_float32_over_the_values_it_stores(variant):
    """The query's int8 rounding is the only difference from float32 attention over the dequantized cache."""
    n, nh, nhkv, d, n_kv = 4, 8, 2, 64, 300
    q = RNG.standard_normal((n, nh, d), dtype=np.float32)
    kb, vb = (reference.quantize_q8_0(RNG.standard_normal((n_kv, nhkv, d), dtype=np.float32)) for _ in range(2))
    mask = np.zeros((n, n_kv), np.float32)
    q8, f32 = np.empty((n, nh, d), np.float32), np.empty((n, nh, d), np.float32)
    native_ops.attention(q, kb, vb, mask, 0.125, q8)()
    native_ops.attention(q, reference.dequantize_q8_0(kb), reference.dequantize_q8_0(vb), mask, 0.125, f32)()
    np.testing.assert_allclose(q8, f32, atol=5e-3)


def test_embedding_rows_of_a_q8_0_table_are_bit_identical_to_gguf(variant):
    raw = gguf.quants.quantize(RNG.standard_normal((50, 96), dtype=np.float32), Q.Q8_0)
    ids, out = np.array([3, 49, 3, 0], np.int32), np.empty((4, 96), np.float32)
    native_ops.embedding_rows(Q8_0Rows(raw, (50, 96)), ids, out)()
    np.testing.assert_array_equal(out, gguf.quants.dequantize(raw, Q.Q8_0).reshape(50, 96)[ids])


@pytest.mark.parametrize("type_name", ["Q4_K", "Q5_K", "Q6_K"])
def test_embedding_rows_of_a_kquant_table_are_bit_identical_to_gguf(type_name, variant):
    """An untied K-quant embedding's lookup in C (each row packed into a tile and read back): gguf's values,
    bit for bit; an id out of range is refused."""
    from kvgraph.backends.quant_repack import AnyRows
    from kvgraph.errors import IndexOutOfRangeError

    raw = gguf_matrix(type_name, 40, 512)
    reader, ids, out = AnyRows(raw, type_name, (40, 512)), np.array([3, 39, 3, 0], np.int32), np.empty((4, 512),
                                                                                                      np.float32)
    native_ops.embedding_rows(reader, ids, out)()
    np.testing.assert_array_equal(out, gguf.quants.dequantize(raw, Q[type_name]).reshape(40, 512)[ids])
    with pytest.raises(IndexOutOfRangeError):
        native_ops.embedding_rows(reader, np.array([1, 40], np.int32), out)()


def test_residual_add_and_a_batched_run_of_kernels(variant):
    a, b = RNG.standard_normal(37, dtype=np.float32), RNG.standard_normal(37, dtype=np.float32)
    out, twice = np.empty_like(a), np.empty_like(a)
    kernels = native.batch([native_ops.add(a, b, out), native_ops.add(out, b, twice)])
    assert len(kernels) == 1                        # two native kernels in a row: one C call
    kernels[0]()
    np.testing.assert_array_equal(out, a + b)
    np.testing.assert_array_equal(twice, (a + b) + b)
    assert native_ops.add(a, b[:5], out) is None    # not equal shapes: the caller keeps numpy's kernel


def test_row_broadcast_multiply_and_scale(variant):
    x, w = RNG.standard_normal((3, 4, 5), dtype=np.float32), RNG.standard_normal(5, dtype=np.float32)
    out, scaled = np.empty_like(x), np.empty_like(x)
    native_ops.mul_rows(x, w, out)()
    native_ops.mul_rows(x, None, scaled, 0.5)()
    np.testing.assert_array_equal(out, x * w)
    np.testing.assert_array_equal(scaled, x * np.float32(0.5))
    assert native_ops.mul_rows(x, w[:4], out) is None          # not one row of x: numpy's kernel instead


@pytest.mark.parametrize("type_name", EXACT)
@pytest.mark.parametrize("kind", ["swiglu", "geglu"])
def test_glu_matmul_gives_the_bits_of_two_matmuls_then_the_activation(type_name, kind, variant):
    """A gated FFN's first half over the stacked gate/up tiles, the products kept in registers: the same
    sums and the same activation as the separate kernels, for every format and activation-row count."""
    f, k = 48, 256
    gate, up = (NativeMat(gguf_matrix(type_name, f, k), type_name, (f, k)) for _ in range(2))
    stacked = NativeMat.fuse([gate, up])
    for m in (1, 3, 9):
        act = quantized(RNG.standard_normal((m, k), dtype=np.float32))
        g, u, ref = (np.full((m, f), np.nan, np.float32) for _ in range(3))
        gate.kernel(act, g)()
        up.kernel(act, u)()
        native_ops.gated(kind, g, u, ref)()
        out = np.full((m, f), np.nan, np.float32)
        stacked.glu_kernel(act, out, kind)()
        np.testing.assert_array_equal(out, ref)
    assert NativeMat.fuse([NativeMat(gguf_matrix(type_name, 24, k), type_name, (24, k))] * 2).glu_kernel(
        act, np.empty((m, 24), np.float32), kind) is None           # halves of part tiles: not this kernel


class _Weight:
    """A compiler's view of a weight: its matmul form and, for the reference, its float values."""

    def __init__(self, mat: NativeMat, shape: tuple[int, ...] | None = None):
        self.mat, self.dense, self.shape = mat, None, shape or (mat.n, mat.k)

    def matrix(self) -> NativeMat:
        return self.mat

    def array(self) -> np.ndarray:
        return self.mat.dequantize().reshape(self.shape)


@pytest.mark.parametrize("types", [("Q4_K", "Q4_K"), ("Q4_K", "Q6_K"), ("Q8_0", "Q5_0")])
def test_glu_matmul_of_two_formats_runs_as_two_matmuls_then_the_activation(types):
    """Where gate and up cannot be stacked (two formats), the native backend computes both products into
    scratch buffers and applies the activation: the bits of the separate kernels either way."""
    from kvgraph.backends import get_backend
    from kvgraph.graph.ir import GraphBuilder
    from kvgraph.plan.planner import plan_graph

    f, k, m = 64, 256, 5
    mats = [NativeMat(gguf_matrix(t, f, k), t, (f, k)) for t in types]
    weights = {"wg": _Weight(mats[0]), "wu": _Weight(mats[1])}
    g = GraphBuilder()
    x = g.input("x", (m, k))
    g.output("y", g.matmul_glu(g.scale(x, 1.0), g.weight("wg", (f, k)), g.weight("wu", (f, k)), "geglu"))
    program = get_backend("native").compile(g.graph, plan_graph(g.graph), weights, {})
    xs = RNG.standard_normal((m, k), dtype=np.float32)
    program.inputs["x"][...] = xs
    program.run()
    act = quantized(xs)
    gate, up, ref = (np.empty((m, f), np.float32) for _ in range(3))
    mats[0].kernel(act, gate)()
    mats[1].kernel(act, up)()
    native_ops.gated("geglu", gate, up, ref)()
    np.testing.assert_array_equal(program.outputs["y"], ref)


class _Dense:
    """A compiler's view of a float32 weight with no tiles (a router)."""

    def __init__(self, a: np.ndarray):
        self.dense, self.mat, self.shape = a, None, a.shape

    def array(self) -> np.ndarray:
        return self.dense


class _TilesOnly(_Weight):
    def array(self) -> np.ndarray:
        raise AssertionError("the experts' float32 values were asked for: kvg_moe_tiles did not take them")


def moe_program(x_rows: int, mats: dict, router: np.ndarray, n_used: int, norm: bool):
    """A native program of one moe_ffn node (behind a scale, so x is a computed buffer) over the stacked
    experts mats (gate, up, down: NativeMat) and router [X, E]."""
    from kvgraph.backends import get_backend
    from kvgraph.graph.ir import GraphBuilder
    from kvgraph.plan.planner import plan_graph

    n_exp, e = router.shape
    f = mats["gate"].n // n_exp
    shapes = {"gate": (n_exp, f, e), "up": (n_exp, f, e), "down": (n_exp, e, f)}
    weights = {"router": _Dense(router), **{k: _TilesOnly(m, shapes[k]) for k, m in mats.items()}}
    g = GraphBuilder()
    x = g.input("x", (x_rows, e))
    g.output("y", g.moe_ffn(g.scale(x, 1.0), g.weight("router", (n_exp, e)), g.weight("up", (n_exp, f, e)),
                            g.weight("gate", (n_exp, f, e)), g.weight("down", (n_exp, e, f)), n_used, norm))
    return get_backend("native").compile(g.graph, plan_graph(g.graph), weights, {})


@pytest.mark.parametrize("types", [("Q4_K", "Q4_K", "Q6_K"), ("Q8_0", "Q8_0", "Q8_0"), ("Q4_0", "Q5_0", "Q4_1")])
def test_experts_run_from_their_tiles_with_the_bits_of_each_experts_matmuls(types, variant):
    """A mixture of experts over its quantized experts' tiles (kvg_moe_tiles): each token's output is
    p_a down_a(silu(gate_a x) * up_a x) + p_b ... in the order of the experts, every product the bits of
    that expert's own matmul kernels (fused gate/up where one format); a token's row is the same alone
    or among others, and close to the float32 mixture over the dequantized experts."""
    n_exp, e, f, n_used, n = 6, 256, 64, 2, 9
    data = {"gate": gguf_matrix(types[0], n_exp * f, e), "up": gguf_matrix(types[1], n_exp * f, e),
            "down": gguf_matrix(types[2], n_exp * e, f if types[2] not in KQUANT_BYTES else 256)}
    if types[2] in KQUANT_BYTES:           # K-quant rows are 256 wide: give the down matrix f = 256
        f = 256
        data["gate"], data["up"] = gguf_matrix(types[0], n_exp * f, e), gguf_matrix(types[1], n_exp * f, e)
    shapes = {"gate": (n_exp * f, e), "up": (n_exp * f, e), "down": (n_exp * e, f)}
    mats = {k: NativeMat(data[k], t, shapes[k]) for k, t in zip(("gate", "up", "down"), types)}
    router = RNG.standard_normal((n_exp, e), dtype=np.float32) * np.float32(0.2)
    xs = RNG.standard_normal((n, e), dtype=np.float32)
    program = moe_program(n, mats, router, n_used, True)
    program.inputs["x"][...] = xs
    program.run()
    out = program.outputs["y"].copy()

    # the same products expert by expert through the plain matmul kernels
    part = {k: [NativeMat(data[k].reshape(n_exp, -1, data[k].shape[-1])[j], t, (shapes[k][0] // n_exp, shapes[k][1]))
                for j in range(n_exp)] for k, t in zip(("gate", "up", "down"), types)}
    logits = xs.astype(np.float64) @ router.T.astype(np.float64)
    ref = np.zeros((n, e), np.float32)
    for t in range(n):
        p = np.exp(logits[t] - logits[t].max())
        p /= p.sum()
        chosen = sorted(np.argsort(-p, kind="stable")[:n_used])
        w = p[chosen] / p[chosen].sum()
        act = quantized(xs[t: t + 1])
        for j, wj in zip(chosen, w):
            gate, up, h, y = [np.empty((1, f), np.float32) for _ in range(3)] + [np.empty((1, e), np.float32)]
            part["gate"][j].kernel(act, gate)()
            part["up"][j].kernel(act, up)()
            native_ops.gated("swiglu", gate, up, h)()
            part["down"][j].kernel(quantized(h), y)()
            ref[t] += np.float32(wj) * y[0]
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())

    for t in (0, 4, 8):                  # alone: the same bits as among the others
        alone = moe_program(1, mats, router, n_used, True)
        alone.inputs["x"][...] = xs[t: t + 1]
        alone.run()
        np.testing.assert_array_equal(alone.outputs["y"][0], out[t])

    dense = {k: m.dequantize().reshape(n_exp, -1, m.k) for k, m in mats.items()}
    want = np.empty((n, e), np.float32)
    node = type("T", (), {"p": {"n_used": n_used, "norm_weights": True}})()
    with np.errstate(over="ignore"):             # exp(-g) of a large negative gate: silu is 0 there
        reference.KERNELS["moe_ffn"](node, want, xs, router, dense["up"], dense["gate"], dense["down"])()
    np.testing.assert_allclose(out, want, atol=0.05 * np.abs(want).max())


def test_numpy_blas_is_limited_only_once_a_native_program_calls_it():
    """The native backend pins numpy's BLAS to one thread (its spinning workers would steal the OpenMP
    kernels' cores) the first time a program uses it, not before: an all-C model never loads threadpoolctl."""
    from kvgraph.backends import get_backend
    from kvgraph.graph.ir import GraphBuilder
    from kvgraph.plan.planner import plan_graph

    backend = get_backend("native")
    g = GraphBuilder()
    x = g.input("x", (4, 64))
    g.output("y", g.add(g.rms_norm(x, 1e-5), x))                # C kernels only
    backend.compile(g.graph, plan_graph(g.graph), {}, {})
    assert not backend._blas_limited
    g = GraphBuilder()
    x = g.input("x", (4, 64))
    g.output("y", g.matmul(x, g.scale(x, 2.0)))                  # activation x activation: numpy's matmul
    backend.compile(g.graph, plan_graph(g.graph), {}, {})
    assert backend._blas_limited


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"])
def test_the_c_packer_makes_the_numpy_packers_tiles(type_name, variant):
    """kvg_pack_tiles (the load path) against pack_blocks / pack_kquant, byte for byte, on random blocks of
    every bit pattern (scales: random finite float16s), rows not a multiple of the tile, on every build."""
    from kvgraph.backends.native import PACK_TYPES, pack_blocks, pack_kquant, pack_tiles_c
    from kvgraph.backends.quant_repack import kquant_parts

    k, n = 512, 37
    raw = gguf_matrix(type_name, n, k)
    rng = np.random.default_rng(7)
    size, scale_at = {"Q4_0": (18, [0]), "Q4_1": (20, [0, 2]), "Q5_0": (22, [0]), "Q5_1": (24, [0, 2]),
                      "Q8_0": (34, [0]), "Q4_K": (144, [0, 2]), "Q5_K": (176, [0, 2]), "Q6_K": (210, [208])}[type_name]
    blocks = raw.reshape(n, -1, size)
    blocks[...] = rng.integers(0, 256, blocks.shape, dtype=np.uint8)
    for at in scale_at:
        blocks[..., at: at + 2] = rng.uniform(-2, 2, blocks.shape[:2]).astype(np.float16)[..., None].view(np.uint8)
    fmt = PACK_TYPES[type_name][1]
    if type_name in ("Q4_K", "Q5_K", "Q6_K"):
        want = pack_kquant(fmt, kquant_parts(raw, type_name))
    else:
        want = pack_blocks(raw, type_name)
    got = np.full(want.shape, 0xAB, np.uint8)
    assert pack_tiles_c(raw, type_name, k, got)
    np.testing.assert_array_equal(got, want)


def test_bias_add_silu_cont_and_concat_in_c(variant):
    """The small ops of the recurrent blocks in C: a bias row added to every row, a scale per head, SiLU row by row (a row's
    bits do not depend on how many rows there are), a strided view made contiguous, a concatenation."""
    from kvgraph.graph.ir import Tensor

    rng = np.random.default_rng(8)
    x = rng.standard_normal((5, 37), dtype=np.float32)
    bias, out = rng.standard_normal(37, dtype=np.float32), np.empty((5, 37), np.float32)
    native_ops.add(x, bias, out)()
    np.testing.assert_array_equal(out, x + bias)
    assert native_ops.add(x, bias[:36], np.empty((5, 36), np.float32)) is None
    x3, scale = rng.standard_normal((4, 3, 6), dtype=np.float32), rng.standard_normal((3, 1), dtype=np.float32)
    out3 = np.empty(x3.shape, np.float32)
    native_ops.mul_rows(x3, scale, out3)()                   # one scale per head
    np.testing.assert_array_equal(out3, x3 * scale)
    native_ops.mul_rows(x3, x3[::-1].copy(), out3)()         # elementwise
    np.testing.assert_array_equal(out3, x3 * x3[::-1])
    native_ops.act("swiglu", x, out)()
    np.testing.assert_allclose(out, x / (1 + np.exp(-x)), rtol=1e-6, atol=1e-6)
    one = np.empty((1, 37), np.float32)
    native_ops.act("swiglu", x[3:4], one)()
    np.testing.assert_array_equal(one[0], out[3])
    src = rng.standard_normal((2, 3, 9, 20), dtype=np.float32)[:, :, 2:7, :15]
    dst = np.empty(src.shape, np.float32)
    native_ops.for_node(Tensor(0, "cont", (), dst.shape, "f32", "", {}), dst, [src])()
    np.testing.assert_array_equal(dst, src)
    a, b = rng.standard_normal((2, 3, 8), dtype=np.float32), rng.standard_normal((2, 5, 8), dtype=np.float32)
    cat = np.empty((2, 8, 8), np.float32)
    native_ops.for_node(Tensor(0, "concat_rows", (), cat.shape, "f32", "", {"axis": 1}), cat, [a, b])()
    np.testing.assert_array_equal(cat, np.concatenate([a, b], axis=1))


# ---- recurrent layers ---------------------------------------------------------------------------------------
def _ssm_case(op: str, n_seqs: int, n: int, rng):
    """Random sources of a Mamba-1 (d 48, state 16) or Mamba-2 (4 heads of 8, 2 groups, state 16) scan, as
    strided views of wider buffers (a projection's output split in parts is what the graphs hand over)."""
    d, s = (48, 16) if op == "ssm_scan" else (32, 16)
    def view(*shape, extra=5):
        return rng.standard_normal(shape[:-1] + (shape[-1] + extra,), dtype=np.float32)[..., :shape[-1]]
    if op == "ssm_scan":
        a = -np.exp(rng.standard_normal((d, s), dtype=np.float32))
        return (view(n_seqs, s, d), view(n_seqs, n, d), view(n_seqs, n, d), a, view(n_seqs, n, s), view(n_seqs, n, s))
    h = 4
    a = -np.exp(rng.standard_normal(h, dtype=np.float32))
    return (view(n_seqs, s, d), view(n_seqs, n, d), view(n_seqs, n, h), a, view(n_seqs, n, 2 * s),
            view(n_seqs, n, 2 * s))


@pytest.mark.parametrize("op", ["ssm_scan", "ssm_scan2"])
def test_the_c_scans_match_numpy_and_a_sequence_alone_equals_it_in_a_batch(op, variant):
    from kvgraph.backends import reference
    from kvgraph.graph.ir import Tensor

    rng = np.random.default_rng(3)
    srcs = _ssm_case(op, 3, 7, rng)
    h0, x = srcs[0], srcs[1]
    node = Tensor(0, op, (), (3, 7 + h0.shape[1], x.shape[2]), "f32", "", {})
    want = np.empty(node.shape, np.float32)
    reference.KERNELS[op](node, want, *srcs)()
    got = np.empty(node.shape, np.float32)
    kernel = native_ops.ssm_scan(op, *srcs, got)
    assert kernel is not None
    kernel()
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    for q in range(3):            # one sequence alone: the same bits as its rows among the three
        one = [v[q: q + 1] if v.ndim == 3 else v for v in srcs]
        alone = np.empty((1,) + node.shape[1:], np.float32)
        native_ops.ssm_scan(op, *one, alone)()
        np.testing.assert_array_equal(alone[0], got[q])


@pytest.mark.parametrize("op,d,heads", [("ssm_scan", 48, 0), ("ssm_scan", 40, 0), ("ssm_scan2", 32, 4),
                                         ("ssm_scan2", 80, 2)])
def test_a_scan_gives_the_same_bits_token_by_token_split_and_in_place(op, d, heads, variant):
    """kvg_ssm_scan2 takes one path for one token per sequence (the state streamed row by row) and another
    for more (per head, blocks of channels); kvg_ssm_scan runs blocks of channels where d and s allow, else
    channel by channel. A sequence's y and state are the same bits however it goes: all its tokens at once,
    one by one, or split 3 + 4, and in place in a state table by slot (the gathered copy's bits), with A read
    as it is or from a transposed copy (a_const). Heads of 40 channels: a whole vector block and a
    remainder; d = 40 takes kvg_ssm_scan's channel path on the AVX-512 build."""
    rng = np.random.default_rng(11)
    s, n, S = 16, 7, 2
    h = max(heads, 1)
    a = (-np.exp(rng.standard_normal((d, s) if op == "ssm_scan" else h, dtype=np.float32)))
    gs = s if op == "ssm_scan" else (2 * s if heads % 2 == 0 else s)
    h0 = rng.standard_normal((S, s, d), dtype=np.float32)
    x, dt = rng.standard_normal((S, n, d), dtype=np.float32), rng.standard_normal((S, n, d if op == "ssm_scan" else h),
                                                                              dtype=np.float32)
    b, c = rng.standard_normal((S, n, gs), dtype=np.float32), rng.standard_normal((S, n, gs), dtype=np.float32)

    def scan(state, t0, t1):
        out = np.empty((S, t1 - t0 + s, d), np.float32)
        native_ops.ssm_scan(op, state, x[:, t0:t1], dt[:, t0:t1], a, b[:, t0:t1], c[:, t0:t1], out,
                            a_const=t0 % 2 == 1)()
        return out[:, :t1 - t0], np.ascontiguousarray(out[:, t1 - t0:])

    y_all, h_all = scan(h0, 0, n)
    for cuts in ([0, 1, 2, 3, 4, 5, 6, 7], [0, 3, 7]):
        state, ys = h0, []
        for t0, t1 in zip(cuts, cuts[1:]):
            y, state = scan(state, t0, t1)
            ys.append(y)
        np.testing.assert_array_equal(np.concatenate(ys, axis=1), y_all)
        np.testing.assert_array_equal(state, h_all)
    pre, post, slots = 5, 3, np.array([3, 1], np.int32)      # in place: the state's columns of a wider row
    table = rng.standard_normal((4, pre + s * d + post), dtype=np.float32)
    table[slots, pre: pre + s * d] = h0.reshape(S, -1)
    before = table.copy()
    for t0, t1 in ([0, 1], [1, 4], [4, 7]):
        view = table[:, pre: pre + s * d].view()
        view.shape = (4, s, d)
        out = np.full((S, t1 - t0 + s, d), 7.0, np.float32)
        native_ops.ssm_scan(op, view, x[:, t0:t1], dt[:, t0:t1], a, b[:, t0:t1], c[:, t0:t1], out, ids=slots,
                            a_const=True)()
        np.testing.assert_array_equal(out[:, :t1 - t0], y_all[:, t0:t1])
        assert (out[:, t1 - t0:] == 7.0).all()              # the state rows of out are left alone
    np.testing.assert_array_equal(table[slots, pre: pre + s * d], h_all.reshape(S, -1))
    others = np.ones(table.shape, bool)
    others[slots, pre: pre + s * d] = False
    np.testing.assert_array_equal(table[others], before[others])


def test_an_in_place_scan_refuses_a_bad_or_repeated_slot(variant):
    from kvgraph.errors import IndexOutOfRangeError

    rng = np.random.default_rng(12)
    h0, x, dt, a, b, c = _ssm_case("ssm_scan2", 2, 1, rng)
    table = np.zeros((3, 16, 32), np.float32)
    out = np.empty((2, 17, 32), np.float32)
    for bad in ([0, 3], [1, 1]):        # out of range; one slot twice (two sequences updating one state)
        with pytest.raises(IndexOutOfRangeError):
            native_ops.ssm_scan("ssm_scan2", table, x, dt, a, b, c, out, ids=np.array(bad, np.int32))()
    assert not table.any()


def test_a_scan_between_a_state_gather_and_write_runs_in_place(variant, monkeypatch):
    """get_rows(state columns, slots) -> ssm_scan2 -> set_rows(same columns, same slots) compiles to the scan
    alone, in place (no gather, no write-back), with the gathered graph's bits and the numpy reference's
    values; a write of other columns of the same rows in between does not stop it."""
    from kvgraph.backends import compiler, get_backend
    from kvgraph.graph.ir import I32, GraphBuilder
    from kvgraph.plan.planner import plan_graph

    monkeypatch.setenv("KVGRAPH_NATIVE_BATCH", "0")
    S, n, d, s, h, pre = 2, 3, 32, 16, 4, 6
    g = GraphBuilder()
    state = g.state("rs.0", (4, pre + s * d))
    slot = g.input("slot", (S,), I32)
    x, dt, a = g.input("x", (S, n, d)), g.input("dt", (S, n, h)), g.input("a", (h,))
    b, c, head = g.input("b", (S, n, 2 * s)), g.input("c", (S, n, 2 * s)), g.input("head", (S, pre))
    h0 = g.reshape(g.get_rows(g.slice_rows(state, pre, s * d, axis=1), slot), (S, s, d))
    dst = g.set_rows(state, head, slot, col=0)
    scan = g.ssm_scan2(h0, x, dt, a, b, c)
    g.set_rows(dst, g.reshape(g.slice_rows(scan, n, s, axis=1), (S, s * d)), slot, col=pre)
    g.output("y", g.cont(g.slice_rows(scan, 0, n, axis=1)))
    rng = np.random.default_rng(13)
    feeds = {"x": (S, n, d), "dt": (S, n, h), "a": (h,), "b": (S, n, 2 * s), "c": (S, n, 2 * s), "head": (S, pre)}
    init = rng.standard_normal((4, pre + s * d), dtype=np.float32)

    def run(backend, steps=3):
        states = {"rs.0": init.copy()}
        program = get_backend(backend).compile(g.graph, plan_graph(g.graph), {}, states)
        r = np.random.default_rng(14)
        ys = []
        for ids in ([2, 0], [0, 3], [3, 2])[:steps]:
            for name, shape in feeds.items():
                program.inputs[name][...] = r.standard_normal(shape, dtype=np.float32)
            program.inputs["a"][...] = -np.abs(program.inputs["a"])
            program.inputs["slot"][...] = ids
            program.run()
            ys.append(program.outputs["y"].copy())
        return program, ys, states["rs.0"]

    program, ys, st = run("native")
    names = [k.__qualname__ for k in program.kernels]
    assert "kvg_ssm_scan2" in names and "kvg_get_rows_f32" not in names and names.count("kvg_set_rows") == 1
    _, ref_ys, ref_st = run("numpy")
    np.testing.assert_allclose(np.stack(ys), np.stack(ref_ys), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(st, ref_st, rtol=1e-4, atol=1e-4)
    monkeypatch.setattr(compiler.FusingCompiler, "_plan_state_scans", lambda self: None)
    program, gathered_ys, gathered_st = run("native")
    assert "kvg_get_rows_f32" in [k.__qualname__ for k in program.kernels]
    np.testing.assert_array_equal(np.stack(ys), np.stack(gathered_ys))
    np.testing.assert_array_equal(st, gathered_st)


def test_a_convolution_of_a_gathered_window_runs_in_place(variant, monkeypatch):
    """get_rows(window columns, slots) -> concat_rows with new inputs -> ssm_conv, the last inputs set_rows'd
    back (LFM2's short convolution) compiles to the convolution alone, in place, with the unfused graph's
    bits and numpy's values."""
    from kvgraph.backends import compiler, get_backend
    from kvgraph.graph.ir import I32, GraphBuilder
    from kvgraph.plan.planner import plan_graph

    monkeypatch.setenv("KVGRAPH_NATIVE_BATCH", "0")
    S, n, d, k = 2, 2, 24, 3
    g = GraphBuilder()
    state = g.state("rs.0", (4, (k - 1) * d))
    slot = g.input("slot", (S,), I32)
    a, b, w = g.input("a", (S * n, d)), g.input("b", (S * n, d)), g.weight("w", (d, k))
    window = g.reshape(g.get_rows(state, slot), (S, k - 1, d))
    conv_x = g.concat_rows(window, g.reshape(g.mul(a, b), (S, n, d)), axis=1)
    g.set_rows(state, g.reshape(g.slice_rows(conv_x, n, k - 1, axis=1), (S, (k - 1) * d)), slot)
    g.output("y", g.ssm_conv(conv_x, w))
    init = np.random.default_rng(15).standard_normal((4, (k - 1) * d), dtype=np.float32)
    weights = {"w": np.random.default_rng(17).standard_normal((d, k), dtype=np.float32)}

    def run(backend):
        states = {"rs.0": init.copy()}
        program = get_backend(backend).compile(g.graph, plan_graph(g.graph), weights, states)
        r, ys = np.random.default_rng(16), []
        for ids in ([2, 0], [0, 3], [3, 2]):
            for name in ("a", "b"):
                program.inputs[name][...] = r.standard_normal((S * n, d), dtype=np.float32)
            program.inputs["slot"][...] = ids
            program.run()
            ys.append(program.outputs["y"].copy())
        return program, np.stack(ys), states["rs.0"]

    program, ys, st = run("native")
    names = [k.__qualname__ for k in program.kernels]
    assert "kvg_ssm_conv" in names and not {"kvg_get_rows_f32", "kvg_copy", "kvg_set_rows"} & set(names)
    _, ref_ys, ref_st = run("numpy")
    np.testing.assert_allclose(ys, ref_ys, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(st, ref_st)
    monkeypatch.setattr(compiler.FusingCompiler, "_plan_state_convs", lambda self: None)
    _, plain_ys, plain_st = run("native")
    np.testing.assert_array_equal(ys, plain_ys)
    np.testing.assert_array_equal(st, plain_st)


def test_the_c_causal_convolution_matches_numpy(variant):
    from kvgraph.backends import reference
    from kvgraph.graph.ir import Tensor

    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3 + 6, 40 + 3), dtype=np.float32)[..., :40]
    w = rng.standard_normal((40, 4), dtype=np.float32)
    node = Tensor(0, "ssm_conv", (), (2, 6, 40), "f32", "", {})
    want, got = np.empty(node.shape, np.float32), np.empty(node.shape, np.float32)
    reference.KERNELS["ssm_conv"](node, want, x, w)()
    native_ops.ssm_conv(x, w, got)()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_the_c_convolution_of_many_tokens_is_that_of_each_token_alone(variant):
    """kvg_ssm_conv works in blocks of channels over all the ubatch's tokens: a token's bits do not depend on
    how many share its ubatch (300 channels: a block and a part)."""
    rng = np.random.default_rng(6)
    n, d, k = 12, 300, 4
    x = rng.standard_normal((2, k - 1 + n, d + 5), dtype=np.float32)[..., :d]
    w = rng.standard_normal((d, k), dtype=np.float32)
    together = np.empty((2, n, d), np.float32)
    native_ops.ssm_conv(x, w, together)()
    for t in range(n):
        alone = np.empty((2, 1, d), np.float32)
        native_ops.ssm_conv(x[:, t: t + k], w, alone)()
        np.testing.assert_array_equal(alone[:, 0], together[:, t])


@pytest.mark.parametrize("n", [1, 2, 5])
def test_an_in_place_convolution_reads_and_writes_its_window_by_slot(n, variant):
    """kvg_ssm_conv in place: each sequence's window read from a state table by slot (the same bits as from a
    concatenation), the last k - 1 inputs written back as the next window (fewer new inputs than the window:
    part of the old one moves up), every other column and slot untouched, also with the output written over
    the new inputs; a repeated slot is refused."""
    from kvgraph.errors import IndexOutOfRangeError

    rng = np.random.default_rng(9)
    S, d, k, pre = 2, 300, 4, 7
    w = rng.standard_normal((d, k), dtype=np.float32)
    table = rng.standard_normal((4, pre + (k - 1) * d + 3), dtype=np.float32)
    slots = np.array([3, 0], np.int32)
    new = rng.standard_normal((S, n, d + 4), dtype=np.float32)[..., :d]
    window = table[:, pre: pre + (k - 1) * d]
    cat = np.concatenate([window[slots].reshape(S, k - 1, d), new], axis=1)
    want = np.empty((S, n, d), np.float32)
    native_ops.ssm_conv(cat, w, want)()
    before, got = table.copy(), np.empty((S, n, d), np.float32)
    same = np.ascontiguousarray(new)            # the output in the inputs' own buffer, as the plan gives it
    native_ops.ssm_conv(same, w, same, window=table.copy()[:, pre: pre + (k - 1) * d], ids=slots)()
    np.testing.assert_array_equal(same, want)
    native_ops.ssm_conv(new, w, got, window=window, ids=slots)()
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(window[slots].reshape(S, k - 1, d), cat[:, n:])
    others = np.ones(table.shape, bool)
    others[slots, pre: pre + (k - 1) * d] = False
    np.testing.assert_array_equal(table[others], before[others])
    with pytest.raises(IndexOutOfRangeError):
        native_ops.ssm_conv(new, w, got, window=window, ids=np.array([1, 1], np.int32))()


def test_state_rows_are_gathered_in_c_and_a_bad_slot_is_refused(variant):
    from kvgraph.errors import IndexOutOfRangeError

    table = np.random.default_rng(5).standard_normal((4, 3, 20000), dtype=np.float32)   # rows of 60000 floats
    out = np.empty((2, 3, 20000), np.float32)
    ids = np.array([3, 1], np.int32)
    native_ops.get_rows(table, ids, out)()
    np.testing.assert_array_equal(out, table[[3, 1]])
    ids[1] = 4
    with pytest.raises(IndexOutOfRangeError):
        native_ops.get_rows(table, ids, out)()
    np.testing.assert_array_equal(out[0], table[3])
    assert not out[1].any()


def test_the_gated_delta_net_in_c_matches_numpy_and_gives_the_same_bits_split_or_batched(variant):
    """kvg_gated_delta_net against the numpy reference (Qwen3-Next's linear attention: 2 key heads of 16 serve
    4 value heads of 8), and a sequence's y and state the same bits alone or beside another, whole or token by
    token, with strided inputs (v a column range of a wider row, as the model slices it)."""
    from kvgraph.graph.ir import Tensor

    rng = np.random.default_rng(13)
    S, n, n_k, n_v, dk, dv = 2, 6, 2, 4, 16, 8
    q, k = (rng.standard_normal((S, n, n_k * dk), dtype=np.float32) / 4 for _ in range(2))
    v = rng.standard_normal((S, n, n_v * dv + 5), dtype=np.float32)[:, :, 5:]
    g = -np.abs(rng.standard_normal((S, n, n_v), dtype=np.float32))
    beta = rng.uniform(0, 1, (S, n, n_v)).astype(np.float32)
    s0 = rng.standard_normal((S, dk, n_v * dv), dtype=np.float32) / 4

    def run(kernel_of, s0, t0, t1, seqs=slice(None)):
        srcs = [s0[seqs], q[seqs, t0:t1], k[seqs, t0:t1], v[seqs, t0:t1], g[seqs, t0:t1], beta[seqs, t0:t1]]
        out = np.full((srcs[1].shape[0], t1 - t0 + dk, n_v * dv), np.nan, np.float32)
        kernel_of(srcs, out)()
        return out

    native = lambda srcs, out: native_ops.gated_delta_net(*srcs, out)  # noqa: E731
    node = Tensor(0, "gated_delta_net", (), (S, n + dk, n_v * dv), "f32", "", {})
    numpy = lambda srcs, out: reference.KERNELS["gated_delta_net"](node, out, *srcs)  # noqa: E731
    whole = run(native, s0, 0, n)
    np.testing.assert_allclose(whole, run(numpy, s0, 0, n), rtol=1e-5, atol=1e-5)
    state, ys = s0, []
    for t in range(n):
        out = run(native, state, t, t + 1)
        ys.append(out[:, :1])
        state = np.ascontiguousarray(out[:, 1:])
    np.testing.assert_array_equal(np.concatenate(ys, axis=1), whole[:, :n])
    np.testing.assert_array_equal(state, whole[:, n:])
    np.testing.assert_array_equal(run(native, s0, 0, n, slice(1, 2))[0], whole[1])


def test_the_gated_delta_net_in_place_by_slot_gives_the_gathered_bits_and_refuses_a_repeated_slot(variant):
    """In place in a state table (the columns of a wider row, by slot): y and the new state are the bits of
    the run on gathered copies, other rows and columns are left alone; a slot named twice is refused."""
    from kvgraph.errors import IndexOutOfRangeError

    rng = np.random.default_rng(17)
    S, n, n_k, n_v, dk, dv = 2, 3, 1, 2, 16, 8
    q, k = (rng.standard_normal((S, n, n_k * dk), dtype=np.float32) / 4 for _ in range(2))
    v = rng.standard_normal((S, n, n_v * dv), dtype=np.float32)
    g = -np.abs(rng.standard_normal((S, n, n_v), dtype=np.float32))
    beta = rng.uniform(0, 1, (S, n, n_v)).astype(np.float32)
    s0 = rng.standard_normal((S, dk, n_v * dv), dtype=np.float32) / 4
    want = np.empty((S, n + dk, n_v * dv), np.float32)
    native_ops.gated_delta_net(s0, q, k, v, g, beta, want)()
    pre, width, slots = 3, dk * n_v * dv, np.array([2, 0], np.int32)
    table = rng.standard_normal((4, pre + width + 5), dtype=np.float32)
    table[slots, pre: pre + width] = s0.reshape(S, -1)
    before = table.copy()
    view = table[:, pre: pre + width].view()
    view.shape = (4, dk, n_v * dv)
    out = np.full((S, n + dk, n_v * dv), 7.0, np.float32)
    native_ops.gated_delta_net(view, q, k, v, g, beta, out, ids=slots)()
    np.testing.assert_array_equal(out[:, :n], want[:, :n])
    assert (out[:, n:] == 7.0).all()
    np.testing.assert_array_equal(table[slots, pre: pre + width], want[:, n:].reshape(S, -1))
    others = np.ones(table.shape, bool)
    others[slots, pre: pre + width] = False
    np.testing.assert_array_equal(table[others], before[others])
    with pytest.raises(IndexOutOfRangeError):
        native_ops.gated_delta_net(view, q, k, v, g, beta, out, ids=np.array([1, 1], np.int32))()

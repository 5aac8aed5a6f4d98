"""The torch backend: repacked weights equal the GGUF ones (up to the documented bf16 rounding), every op
equals the numpy reference, tiny models match numpy, and the graph cache changes nothing -- each with and
without kvgraph's C kernels. The real models' accuracy rule is in test_quantized_backends.py."""
from __future__ import annotations

import sys

import gguf
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tiny_models import (TINY_CASES, TinySpec, assert_tiny_case_matches_numpy, logits_trace,  # noqa: E402
                         write_tiny_llama)

from kvgraph.backends import get_backend, native  # noqa: E402
from kvgraph.backends import quant_repack as qr  # noqa: E402
from kvgraph.backends.numpy_backend import NumpyBackend  # noqa: E402
from kvgraph.backends.torch_backend import Int4Mat, Int8Mat, TorchBackend, TorchWeight  # noqa: E402
from kvgraph.engine.context import Context  # noqa: E402
from kvgraph.engine.loader import load_model  # noqa: E402
from kvgraph.errors import InvalidArgumentError  # noqa: E402
from kvgraph.gguf.reader import TensorInfo  # noqa: E402
from kvgraph.graph.ir import I32, GraphBuilder  # noqa: E402
from kvgraph.plan.planner import plan_graph  # noqa: E402

rng = np.random.default_rng(0)
Q = gguf.GGMLQuantizationType


def f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def random_blocks(type_name: str, rows: int, cols: int) -> np.ndarray:
    """Raw blocks for types gguf cannot quantize (K-quants): random bytes with small, finite f16 scales."""
    block, size = gguf.GGML_QUANT_SIZES[Q[type_name]]
    raw = rng.integers(0, 256, (rows, cols // block * size), dtype=np.uint8)
    blocks = raw.reshape(rows, -1, size)
    scales = {"Q4_K": (0, 2), "Q6_K": (208,)}[type_name]
    for at in scales:
        d = rng.uniform(0.001, 0.01, blocks.shape[:2] + (1,)).astype(np.float16)
        blocks[..., at: at + 2] = d.view(np.uint8)
    return raw


class FakeFile:
    """Just enough of GGUFFile for TorchWeight: tensors (raw GGUF data), tensor() and dequantize."""

    def __init__(self):
        self.tensors: dict[str, TensorInfo] = {}

    def tensor(self, name: str) -> TensorInfo | None:
        return self.tensors.get(name)

    def add(self, name: str, value: np.ndarray | None = None, qtype: str = "F32", shape=None) -> np.ndarray:
        """Store value as qtype (or random blocks when value is None); returns the dequantized float32."""
        if qtype == "F32":
            data = np.ascontiguousarray(value, np.float32)
        elif value is None:
            data = random_blocks(qtype, *shape)
        else:
            data = gguf.quants.quantize(value.astype(np.float32), Q[qtype])
        shape = tuple(shape or value.shape)
        self.tensors[name] = TensorInfo(name, qtype, shape, data.nbytes, data)
        return self.dequantize(name)

    def dequantize(self, name: str) -> np.ndarray:
        info = self.tensors[name]
        if info.type_name == "F32":
            return np.array(info.data, np.float32)
        return gguf.quants.dequantize(info.data, Q[info.type_name]).astype(np.float32).reshape(info.shape)


@pytest.fixture(autouse=True, params=["native", "torch-kernels"])
def kernels(request, monkeypatch):
    """Every op and tiny-model test runs twice: with kvgraph's C kernels (the default) and without them
    (torch's int4pack / int8 matmuls and torch ops: the path taken where no C compiler exists)."""
    if request.param == "native" and native.library() is None:
        pytest.skip(f"native kernels unavailable: {native.why_not()}")
    if request.param == "torch-kernels":
        monkeypatch.setenv("KVGRAPH_NATIVE", "0")
        monkeypatch.setattr(native, "_lib", None)
        monkeypatch.setattr(native, "_why_not", "disabled by KVGRAPH_NATIVE=0")
    return request.param


def run_both(build, inputs=(), weights: FakeFile | None = None, states=()):
    """Run a hand-built graph on the numpy and the torch backend; returns (numpy outputs, torch outputs,
    numpy states after, torch states after)."""
    results = []
    for backend in (NumpyBackend(), TorchBackend()):
        g = GraphBuilder()
        build(g)
        wfile = weights or FakeFile()
        if isinstance(backend, NumpyBackend):
            w = {name: wfile.dequantize(name) for name in wfile.tensors}
        else:
            w = {name: TorchWeight(wfile, name, backend.arena) for name in wfile.tensors}
        st = {name: np.array(v, np.float32) for name, v in dict(states).items()}
        program = backend.compile(g.graph, plan_graph(g.graph), w, st)
        for name, value in dict(inputs).items():
            if name in program.inputs:
                program.inputs[name][...] = value
        program.run()
        results.append(({n: backend.to_numpy(b) for n, b in program.outputs.items()}, st))
    (ref, ref_st), (got, got_st) = results
    return ref, got, ref_st, got_st


def assert_same(ref: dict, got: dict, rtol=1e-5, atol=1e-5):
    assert ref.keys() == got.keys()
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], rtol=rtol, atol=atol, err_msg=name)


# ---- repacking ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q4_K"])
def test_int4_groups_decompose_gguf_blocks_exactly(type_name):
    rows, cols = 48, 512
    raw = random_blocks(type_name, rows, cols) if type_name == "Q4_K" else \
        gguf.quants.quantize(f32(rows, cols), Q[type_name])
    ref = gguf.quants.dequantize(raw, Q[type_name]).reshape(rows, cols).astype(np.float64)
    (r0, q, scale, zero), = qr.int4_groups(raw, type_name)
    assert r0 == 0 and q.dtype == np.uint8 and q.max() <= 15
    ours = (q - 8.0) * np.repeat(scale, 32, 1).astype(np.float64) + np.repeat(zero, 32, 1)
    np.testing.assert_array_equal(ours, ref)      # w = (q - 8) * scale + zero, bit for bit


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q4_K"])
@pytest.mark.parametrize("rows", [128, 72])       # 72: padded to a multiple of 16 output channels
def test_int4pack_kernel_weight_equals_gguf_up_to_bf16_scale_and_zero(type_name, rows):
    """The weight the int4pack kernel multiplies by (read back through the kernel with one-hot inputs)
    equals (q - 8) * bf16(scale) + bf16(zero): the GGUF weight with only its scale and zero rounded to
    bfloat16 (then, being a kernel output, rounded to bf16 itself)."""
    cols = 512
    raw = random_blocks(type_name, rows, cols) if type_name == "Q4_K" else \
        gguf.quants.quantize(f32(rows, cols), Q[type_name])
    mat = Int4Mat(raw, type_name, (rows, cols))
    (_, q, scale, zero), = qr.int4_groups(raw, type_name)
    s = np.repeat(qr.bf16_round(scale), 32, 1).astype(np.float64)
    z = np.repeat(qr.bf16_round(zero), 32, 1).astype(np.float64)
    expected = qr.bf16_round(((q - 8.0) * s + z).astype(np.float32))
    np.testing.assert_array_equal(mat.dequantize(), expected)
    # ... and the only difference to gguf's dequantization is that rounding of scale and zero.
    ref = gguf.quants.dequantize(raw, Q[type_name]).reshape(rows, cols)
    bound = np.abs(q - 8.0) * np.abs(np.repeat(scale, 32, 1) - s) + np.abs(np.repeat(zero, 32, 1) - z)
    bound += np.abs(expected) * 2.0 ** -8 + 1e-12             # the bf16 output rounding of the read-back
    assert np.all(np.abs(mat.dequantize() - ref) <= bound)


def test_int4_packing_in_row_chunks_equals_packing_whole(monkeypatch):
    raw = gguf.quants.quantize(f32(320, 256), Q.Q4_1)
    whole = Int4Mat(raw, "Q4_1", (320, 256))
    monkeypatch.setattr(qr, "CHUNK_ROWS", 64)
    chunked = Int4Mat(raw, "Q4_1", (320, 256))
    assert torch.equal(whole.packed, chunked.packed) and torch.equal(whole.sz, chunked.sz)


def test_int8_rows_scales_are_bf16_exact_and_error_is_half_a_step():
    w = f32(64, 256) * np.exp(rng.uniform(-3, 3, (64, 1))).astype(np.float32)
    q, scale = qr.int8_rows(w)
    assert np.array_equal(qr.bf16_round(scale), scale)
    assert np.abs(q).max() <= 127
    assert np.all(np.abs(q * scale[:, None] - w) <= scale[:, None] * 0.5 * (1 + 1e-6))


def test_vocabulary_projection_is_column_equalized_which_beats_plain_per_row_int8():
    f = FakeFile()
    value = f32(256, 128) * np.exp(rng.uniform(-2, 2, 128)).astype(np.float32)   # uneven column ranges
    exact = f.add("output.weight", value, "Q8_0")
    f.add("blk.0.attn_v.weight", value, "Q8_0")
    out, plain = TorchWeight(f, "output.weight").matrix(), TorchWeight(f, "blk.0.attn_v.weight").matrix()
    assert isinstance(out, Int8Mat) and out.col is not None and plain.col is None
    err = [np.sqrt(((m.dequantize() - exact) ** 2).mean()) for m in (out, plain)]
    assert err[0] < 0.75 * err[1]
    x = f32(2, 128)
    y = torch.empty(2, 256)
    out.kernel(torch.from_numpy(x).bfloat16(), y)()
    np.testing.assert_allclose(y.numpy(), x @ exact.T, atol=0.05 * np.abs(x @ exact.T).max())


def test_q8_0_rows_are_looked_up_bit_identically_without_a_dense_table():
    f = FakeFile()
    table = f.add("token_embd.weight", f32(300, 64), "Q8_0")
    w = TorchWeight(f, "token_embd.weight")
    assert w.dense is None and w.mat is None          # compact: the raw blocks only
    ids = np.array([7, 0, 299, 7], np.int32)
    out = np.empty((4, 64), np.float32)
    w.rows().kernel(ids, out)()
    np.testing.assert_array_equal(out, table[ids])


# ---- every op against the numpy reference ------------------------------------------------------------------
MATMUL_TYPES = {"F32": 1e-6, "F16": 3e-2, "Q8_0": 3e-2, "Q5_0": 3e-2, "Q4_0": 1e-2, "Q4_1": 1e-2,
                "Q4_K": 1e-2, "Q6_K": 3e-2, "BF16": 3e-2}


@pytest.mark.parametrize("type_name", sorted(MATMUL_TYPES))
@pytest.mark.parametrize("m", [1, 7])
def test_weight_matmul_equals_dequantized_f32(type_name, m):
    """Each quant type's matmul form against x @ W^T with W dequantized in float32 (int4: bf16 activations
    and scales; int8 types: re-quantized per row, bf16 activations)."""
    f = FakeFile()
    n, k = 96, 256
    value = None if type_name in ("Q4_K", "Q6_K") else f32(n, k) / 16
    w = f.add("w", value, type_name, shape=(n, k))
    x = f32(m, k)
    _, got, _, _ = run_both(lambda g: g.output("y", g.matmul(g.input("x", (m, k)), g.weight("w", (n, k)))),
                            {"x": x}, f)
    ref = x @ w.T
    tol = MATMUL_TYPES[type_name] * np.abs(x).max(1, keepdims=True) @ np.abs(w).sum(1, keepdims=True).T / k ** 0.5
    assert np.all(np.abs(got["y"] - ref) <= tol + 1e-6)


@pytest.mark.parametrize("type_name", ["Q4_0", "Q8_0"])
def test_matmuls_sharing_an_input_are_stacked_into_one_with_identical_results(type_name):
    f = FakeFile()
    for name, n in (("a", 128), ("b", 64), ("c", 192)):
        f.add(name, f32(n, 256) / 16, type_name)
    x = f32(3, 256)

    def build(g):
        h = g.input("x", (3, 256))
        for name, n in (("a", 128), ("b", 64), ("c", 192)):
            g.output(name, g.matmul(h, g.weight(name, (n, 256))))

    be = TorchBackend()
    weights = {name: TorchWeight(f, name, be.arena) for name in f.tensors}
    singles = {}
    for name in weights:                       # each alone, before stacking
        g = GraphBuilder()
        g.output(name, g.matmul(g.input("x", (3, 256)), g.weight(name, weights[name].shape)))
        p = be.compile(g.graph, plan_graph(g.graph), weights, {})
        p.inputs["x"][...] = x
        p.run()
        singles[name] = be.to_numpy(p.outputs[name])
    g = GraphBuilder()
    build(g)
    program = be.compile(g.graph, plan_graph(g.graph), weights, {})
    program.inputs["x"][...] = x
    program.run()
    assert len(be._fused) == 1
    for name in singles:
        np.testing.assert_array_equal(be.to_numpy(program.outputs[name]), singles[name])


@pytest.mark.parametrize("n", [3, 200])             # 200 rows: the large-tensor (torch) kernels
@pytest.mark.parametrize("op", ["add", "mul", "swiglu", "geglu"])
def test_binary_ops(op, n):
    a, b = f32(n, 96), f32(96)
    ref, got, _, _ = run_both(lambda g: g.output("y", getattr(g, op)(g.input("a", (n, 96)), g.input("b", (96,)))),
                              {"a": a, "b": b})
    assert_same(ref, got)


@pytest.mark.parametrize("n", [3, 200])
@pytest.mark.parametrize("op", ["silu", "gelu", "cont"])
def test_unary_ops(op, n):
    x = f32(n, 96)
    ref, got, _, _ = run_both(lambda g: g.output("y", getattr(g, op)(g.input("x", (n, 96)))), {"x": x})
    assert_same(ref, got)


@pytest.mark.parametrize("n", [3, 200])
def test_scale_rms_norm_and_the_fused_norm_times_weight(n):
    f = FakeFile()
    f.add("w", 1 + f32(96) / 10)
    x = f32(n, 96)

    def build(g):
        y = g.scale(g.input("x", (n, 96)), 1.5)
        g.output("plain", g.rms_norm(y, 1e-6))
        g.output("fused", g.mul(g.rms_norm(g.add(y, y), 1e-5), g.weight("w", (96,))))
    ref, got, _, _ = run_both(build, {"x": x}, f)
    assert_same(ref, got, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("masked", [False, True])
def test_softmax(masked):
    x = f32(2, 3, 4, 6)
    mask = np.where(rng.random((4, 6)) < 0.3, -np.inf, 0).astype(np.float32)
    mask[:, 0] = 0

    def build(g):
        m = g.input("m", mask.shape) if masked else None
        g.output("y", g.softmax(g.input("x", x.shape), m, 0.5))
    ref, got, _, _ = run_both(build, {"x": x, "m": mask})
    assert_same(ref, got)


@pytest.mark.parametrize("transpose_b", [True, False])
@pytest.mark.parametrize("a_shape,b_shape", [((3, 5, 8), (3, 6, 8)), ((5, 8), (6, 8)), ((2, 3, 5, 8), (3, 6, 8))])
def test_activation_matmuls(a_shape, b_shape, transpose_b):
    a, b = f32(*a_shape), f32(*b_shape)
    if not transpose_b:
        b = np.ascontiguousarray(np.swapaxes(b, -1, -2))
    ref, got, _, _ = run_both(lambda g: g.output("y", g.matmul(g.input("a", a.shape), g.input("b", b.shape),
                                                               transpose_b=transpose_b)), {"a": a, "b": b})
    assert_same(ref, got)


def test_get_rows_of_activations_and_f32_weights():
    f = FakeFile()
    f.add("t", f32(10, 8))
    x, ids = f32(6, 8), np.array([3, 0, 3, 5], np.int32)

    def build(g):
        i = g.input("i", (4,), I32)
        g.output("w", g.get_rows(g.weight("t", (10, 8)), i))
        g.output("x", g.get_rows(g.cont(g.input("x", (6, 8))), i))
    ref, got, _, _ = run_both(build, {"i": ids, "x": x}, f)
    assert_same(ref, got, rtol=0, atol=0)


@pytest.mark.parametrize("neox", [False, True])
@pytest.mark.parametrize("n_dims,freq_scale", [(16, 1.0), (8, 0.25)])
@pytest.mark.parametrize("n", [1, 5])
def test_rope(neox, n_dims, freq_scale, n):
    x, pos = f32(n, 3, 16), np.array([0, 1, 2, 700, 100][:n], np.int32)

    def build(g):
        p = g.input("p", (n,), I32)
        xi = g.input("x", x.shape)
        g.output("a", g.rope(xi, p, n_dims, 10000.0, neox, freq_scale))
        g.output("b", g.rope(g.scale(xi, 2.0), p, n_dims, 10000.0, neox, freq_scale))   # shared tables
    ref, got, _, _ = run_both(build, {"x": x, "p": pos})
    assert_same(ref, got, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n", [1, 4, 20])            # 20: past the C kernel's limit, torch's batched path
def test_flash_attn_with_grouped_heads(n):
    H, Hkv, d, n_kv = 6, 2, 8, 9
    q, k, v = f32(n, H, d), f32(n_kv, Hkv, d), f32(n_kv, Hkv, d)
    mask = np.zeros((n, n_kv), np.float32)
    mask[0, 5:] = -np.inf
    ref, got, _, _ = run_both(lambda g: g.output("y", g.flash_attn(
        g.cont(g.input("q", q.shape)), g.input("k", k.shape), g.input("v", v.shape), g.input("m", mask.shape), 0.3)),
        {"q": q, "k": k, "v": v, "m": mask})
    assert_same(ref, got)


def test_set_rows_rows_transposed_and_partial_columns():
    src, idx = f32(2, 3), np.array([4, 1], np.int32)
    states = {"st": np.zeros((6, 3)), "stt": np.zeros((3, 6)), "wide": np.zeros((6, 7))}

    def build(g):
        i = g.input("i", (2,), I32)
        s = g.input("s", (2, 3))
        g.output("a", g.view_rows(g.set_rows(g.state("st", (6, 3)), s, i), 5))
        g.output("b", g.view_cols(g.set_rows(g.state("stt", (3, 6)), s, i, transposed=True), 5))
        g.output("c", g.set_rows(g.set_rows(g.state("wide", (6, 7)), s, i, col=4), g.scale(s, 2.0), i, col=1))
    ref, got, ref_st, got_st = run_both(build, {"i": idx, "s": src}, states=states)
    assert_same(ref, got, rtol=0, atol=0)
    for name in states:
        np.testing.assert_array_equal(got_st[name], ref_st[name])


def test_recurrent_ops_concat_conv_and_scan():
    n, d, s, k = 3, 5, 4, 4
    inputs = {"h0": f32(s, d), "x": f32(n, d), "dt": f32(n, d), "b": f32(n, s), "c": f32(n, s),
              "prev": f32(k - 1, d)}
    f = FakeFile()
    f.add("a", -np.exp(f32(d, s)))
    f.add("w", f32(d, k))

    def build(g):
        i = {name: g.input(name, v.shape) for name, v in inputs.items()}
        cx = g.concat_rows(i["prev"], i["x"])
        g.output("conv", g.ssm_conv(cx, g.weight("w", (d, k))))
        g.output("scan", g.ssm_scan(i["h0"], i["x"], i["dt"], g.weight("a", (d, s)), i["b"], i["c"]))
    ref, got, _, _ = run_both(build, inputs, f)
    assert_same(ref, got)


# ---- whole (tiny) models -----------------------------------------------------------------------------------
@pytest.mark.parametrize("flash", [False, True], ids=["vtrans", "flash"])
@pytest.mark.parametrize("name", list(TINY_CASES))
def test_tiny_model_logits_match_numpy(tmp_path, name, flash):
    assert_tiny_case_matches_numpy(tmp_path, name, "torch", flash)


def test_tiny_model_logits_are_bit_identical_with_the_graph_cache_off(tmp_path):
    path = tmp_path / "t.gguf"
    write_tiny_llama(path, TinySpec(weight_type="Q4_1", n_embd=128, n_ff=256))
    on = logits_trace(path, "torch", False)
    off = logits_trace(path, "torch", False, graph_cache=False)
    np.testing.assert_array_equal(on, off)


# ---- registration ------------------------------------------------------------------------------------------
def test_the_torch_backend_is_chosen_by_name():
    assert get_backend("torch").name == "torch" and get_backend("TORCH").name == "torch"
    assert get_backend("numpy").name == "numpy"


def test_torch_backend_without_torch_says_how_to_install_it(monkeypatch):
    monkeypatch.delitem(sys.modules, "kvgraph.backends.torch_backend", raising=False)
    monkeypatch.setitem(sys.modules, "torch", None)          # import torch -> ImportError
    with pytest.raises(InvalidArgumentError, match=r"pip install 'kvgraph\[fast\]'"):
        get_backend("torch")


def test_flash_attention_auto_is_on_exactly_where_the_c_attention_kernel_exists(tmp_path, kernels):
    path = tmp_path / "t.gguf"
    write_tiny_llama(path, TinySpec())
    torch_ctx = Context(load_model(path, get_backend("torch")), n_ctx=32)
    assert torch_ctx.flash_attn is (kernels == "native")
    assert Context(load_model(path, get_backend("numpy")), n_ctx=32).flash_attn is False
    assert Context(load_model(path, get_backend("torch")), n_ctx=32, flash_attn=False).flash_attn is False


def test_gated_nodes_share_one_activation_buffer(monkeypatch):
    """Without the C kernels a program's swiglu / geglu nodes compute through one float32 activation
    buffer, not one per layer (a 512-token SmolLM2 prompt would hold 30 of 3 MB), and give numpy's results."""
    import kvgraph.backends.torch_backend as tb

    made = []
    real_empty = tb.torch.empty

    def counting_empty(*shape, **kw):
        t = real_empty(*shape, **kw)
        made.append(tuple(t.shape))
        return t

    rng = np.random.default_rng(5)
    x = rng.standard_normal((64, 96), dtype=np.float32)

    def build(g):
        h = g.input("x", (64, 96))
        for kind in ("swiglu", "geglu", "swiglu"):
            h = g.add(h, getattr(g, kind)(g.scale(h, 0.5), g.silu(h)))
        g.output("y", h)

    outs = []
    for backend in (NumpyBackend(), TorchBackend(native_kernels=False)):
        g = GraphBuilder()
        build(g)
        monkeypatch.setattr(tb.torch, "empty", counting_empty)
        program = backend.compile(g.graph, plan_graph(g.graph), {}, {})
        monkeypatch.setattr(tb.torch, "empty", real_empty)
        program.inputs["x"][...] = x
        program.run()
        outs.append(backend.to_numpy(program.outputs["y"]))
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    assert made.count(x.shape) == 1

"""Each IR op on the numpy backend equals its plain numpy formula."""
from __future__ import annotations

import math

import numpy as np
import pytest

from graph_harness import run_graph
from kvgraph.graph.ir import I32, GraphBuilder

rng = np.random.default_rng(0)


def f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def test_matmul_with_weight_layout_is_x_times_w_transposed():
    x, w = f32(3, 8), f32(5, 8)
    out = run_graph(lambda g: g.output("y", g.matmul(g.input("x", (3, 8)), g.weight("w", (5, 8)))),
                    {"x": x}, {"w": w})["y"]
    np.testing.assert_allclose(out, x @ w.T, rtol=1e-5, atol=1e-5)


def test_batched_matmul_broadcasts_and_can_skip_the_transpose():
    a, b = f32(2, 3, 4), f32(2, 4, 6)
    out = run_graph(lambda g: g.output("y", g.matmul(g.input("a", a.shape), g.input("b", b.shape), transpose_b=False)),
                    {"a": a, "b": b})["y"]
    np.testing.assert_allclose(out, a @ b, rtol=1e-5, atol=1e-5)


def test_get_rows_gathers_table_rows():
    table, ids = f32(10, 4), np.array([3, 0, 3, 9], np.int32)
    out = run_graph(lambda g: g.output("y", g.get_rows(g.weight("t", (10, 4)), g.input("i", (4,), I32))),
                    {"i": ids}, {"t": table})["y"]
    np.testing.assert_array_equal(out, table[ids])


@pytest.mark.parametrize("op,formula", [
    ("add", lambda a, b: a + b), ("mul", lambda a, b: a * b),
    ("swiglu", lambda a, b: a / (1 + np.exp(-a)) * b),
    ("geglu", lambda a, b: 0.5 * a * (1 + np.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a ** 3))) * b),
])
def test_binary_ops_broadcast_like_numpy(op, formula):
    a, b = f32(3, 5), f32(5)
    out = run_graph(lambda g: g.output("y", getattr(g, op)(g.input("a", (3, 5)), g.input("b", (5,)))),
                    {"a": a, "b": b})["y"]
    np.testing.assert_allclose(out, formula(a, b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op,formula", [
    ("silu", lambda x: x / (1 + np.exp(-x))),
    ("gelu", lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))),
    ("cont", lambda x: x),
    ("sigmoid", lambda x: 1 / (1 + np.exp(-x))),
    ("softplus", lambda x: np.log1p(np.exp(x))),
])
def test_unary_ops(op, formula):
    x = f32(4, 6)
    out = run_graph(lambda g: g.output("y", getattr(g, op)(g.input("x", (4, 6)))), {"x": x})["y"]
    np.testing.assert_allclose(out, formula(x), rtol=1e-5, atol=1e-6)


def test_scale_and_rms_norm():
    x = f32(3, 16)
    out = run_graph(lambda g: g.output("y", g.rms_norm(g.scale(g.input("x", (3, 16)), 2.5), 1e-6)), {"x": x})["y"]
    y = 2.5 * x
    np.testing.assert_allclose(out, y / np.sqrt((y * y).mean(-1, keepdims=True) + 1e-6), rtol=1e-5, atol=1e-6)


def test_softmax_with_mask_and_scale():
    x, mask = f32(2, 3, 4, 6), np.where(rng.random((4, 6)) < 0.3, -np.inf, 0).astype(np.float32)
    mask[:, 0] = 0
    out = run_graph(lambda g: g.output("y", g.softmax(g.input("x", x.shape), g.input("m", mask.shape), 0.5)),
                    {"x": x, "m": mask})["y"]
    z = x * 0.5 + mask
    ref = np.exp(z - z.max(-1, keepdims=True))
    np.testing.assert_allclose(out, ref / ref.sum(-1, keepdims=True), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("neox", [False, True])
@pytest.mark.parametrize("n_dims", [8, 4])
def test_rope_rotates_pairs_or_halves(neox, n_dims):
    n, heads, hd, base = 5, 2, 8, 10000.0
    x, pos = f32(n, heads, hd), np.array([0, 1, 2, 7, 100], np.int32)
    out = run_graph(lambda g: g.output("y", g.rope(g.input("x", x.shape), g.input("p", (n,), I32), n_dims, base, neox)),
                    {"x": x, "p": pos})["y"]
    theta = pos[:, None, None] * base ** (-np.arange(0, n_dims, 2) / n_dims)
    if neox:
        a, b = x[..., : n_dims // 2], x[..., n_dims // 2: n_dims]
    else:
        a, b = x[..., 0:n_dims:2], x[..., 1:n_dims:2]
    ra, rb = a * np.cos(theta) - b * np.sin(theta), a * np.sin(theta) + b * np.cos(theta)
    ref = x.copy()
    if neox:
        ref[..., : n_dims // 2], ref[..., n_dims // 2: n_dims] = ra, rb
    else:
        ref[..., 0:n_dims:2], ref[..., 1:n_dims:2] = ra, rb
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_set_rows_writes_state_rows_and_columns():
    state = np.zeros((6, 3), np.float32)
    state_t = np.zeros((3, 6), np.float32)
    src, idx = f32(2, 3), np.array([4, 1], np.int32)

    def build(g):
        i = g.input("i", (2,), I32)
        s = g.input("s", (2, 3))
        g.output("a", g.view_rows(g.set_rows(g.state("st", (6, 3)), s, i), 5))
        g.output("b", g.view_cols(g.set_rows(g.state("stt", (3, 6)), s, i, transposed=True), 5))
    out = run_graph(build, {"i": idx, "s": src}, states={"st": state, "stt": state_t})
    expected = np.zeros((6, 3), np.float32)
    expected[idx] = src
    np.testing.assert_array_equal(state, expected)
    np.testing.assert_array_equal(state_t, expected.T)
    np.testing.assert_array_equal(out["a"], expected[:5])
    np.testing.assert_array_equal(out["b"], expected.T[:, :5])


def test_flash_attn_equals_grouped_softmax_attention():
    n, H, Hkv, d, n_kv = 3, 4, 2, 8, 7
    q, k, v = f32(n, H, d), f32(n_kv, Hkv, d), f32(n_kv, Hkv, d)
    mask = np.zeros((n, n_kv), np.float32)
    mask[0, 5:] = -np.inf
    out = run_graph(lambda g: g.output("y", g.flash_attn(g.input("q", q.shape), g.input("k", k.shape),
                                                         g.input("v", v.shape), g.input("m", mask.shape), 0.3)),
                    {"q": q, "k": k, "v": v, "m": mask})["y"]
    for h in range(H):
        s = q[:, h] @ k[:, h // 2].T * 0.3 + mask
        p = np.exp(s - s.max(-1, keepdims=True))
        np.testing.assert_allclose(out[:, h], (p / p.sum(-1, keepdims=True)) @ v[:, h // 2], rtol=1e-5, atol=1e-5)


def test_views_reshape_and_permute_cost_no_kernels():
    g = GraphBuilder()
    x = g.input("x", (2, 3, 4))
    g.output("y", g.permute(g.reshape(g.reshape(x, (6, 4)), (2, 12)), (1, 0)))
    from kvgraph.backends.numpy_backend import NumpyBackend
    from kvgraph.plan.planner import plan_graph
    program = NumpyBackend().compile(g.graph, plan_graph(g.graph), {}, {})
    assert program.kernels == []
    xv = f32(2, 3, 4)
    program.inputs["x"][...] = xv
    np.testing.assert_array_equal(program.outputs["y"], xv.reshape(2, 12).T)


def test_reshape_of_a_non_contiguous_view_is_refused():
    def build(g):
        g.output("y", g.reshape(g.permute(g.input("x", (2, 3)), (1, 0)), (6,)))
    with pytest.raises(ValueError, match="cont"):
        run_graph(build, {"x": f32(2, 3)})


def test_shape_errors_are_caught_at_build_time():
    g = GraphBuilder()
    with pytest.raises(ValueError):
        g.matmul(g.input("a", (2, 3)), g.input("b", (4, 5)))
    with pytest.raises(ValueError):
        g.add(g.input("c", (2, 3)), g.input("d", (4, 3)))


def test_sigmoid_and_softplus_of_large_inputs_are_finite():
    x = np.array([[-200.0, -30.0, 0.0, 30.0, 200.0]], np.float32)
    out = run_graph(lambda g: (g.output("s", g.sigmoid(g.input("x", x.shape))),
                               g.output("p", g.softplus(g.input("x", x.shape)))), {"x": x})
    np.testing.assert_allclose(out["s"], [[0.0, 9.357623e-14, 0.5, 1.0, 1.0]], rtol=1e-6)
    np.testing.assert_allclose(out["p"], [[0.0, 9.357623e-14, math.log(2), 30.0, 200.0]], rtol=1e-6)


def gated_delta_rule(s0, q, k, v, g, beta):
    """The gated delta rule as transformers' torch_recurrent_gated_delta_rule writes it (state [dk, dv] per
    value head, query / key heads repeated to the value heads), in float64: -> (y [n, Hv, dv], state)."""
    n, n_k, dk = q.shape
    n_v = v.shape[1]
    q, k = (np.repeat(a.astype(np.float64), n_v // n_k, axis=1) for a in (q, k))
    state = s0.astype(np.float64).copy()
    y = np.zeros(v.shape)
    for t in range(n):
        state *= np.exp(g[t])[:, None, None]
        kv_mem = (state * k[t][:, :, None]).sum(axis=1)
        delta = (v[t] - kv_mem) * beta[t][:, None]
        state += k[t][:, :, None] * delta[:, None, :]
        y[t] = (state * q[t][:, :, None]).sum(axis=1)
    return y, state


def test_gated_delta_net_is_the_gated_delta_rule_per_sequence():
    S, n, n_k, n_v, dk, dv = 2, 5, 2, 4, 8, 6
    q, k = f32(S, n, n_k, dk) / 3, f32(S, n, n_k, dk) / 3
    v, g, beta = f32(S, n, n_v, dv), -np.abs(f32(S, n, n_v)), 1 / (1 + np.exp(-f32(S, n, n_v)))
    s0 = f32(S, n_v, dk, dv) / 4                  # per head [dk, dv], as transformers keeps it
    carried = np.ascontiguousarray(s0.transpose(0, 1, 3, 2)).reshape(S, dk, n_v * dv)   # kvgraph's [Hv, dv, dk]
    shapes = {"s0": (S, dk, n_v * dv), "q": (S, n, n_k * dk), "k": (S, n, n_k * dk), "v": (S, n, n_v * dv),
              "g": (S, n, n_v), "b": (S, n, n_v)}

    def build(gb):
        gb.output("y", gb.gated_delta_net(*(gb.input(name, shape) for name, shape in shapes.items())))
    out = run_graph(build, {"s0": carried, "q": q.reshape(shapes["q"]), "k": k.reshape(shapes["k"]),
                            "v": v.reshape(shapes["v"]), "g": g, "b": beta.astype(np.float32)})["y"]
    assert out.shape == (S, n + dk, n_v * dv)
    for s in range(S):
        y, state = gated_delta_rule(s0[s], q[s], k[s], v[s], g[s], beta[s])
        np.testing.assert_allclose(out[s, :n], y.reshape(n, -1), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out[s, n:].reshape(n_v, dv, dk), state.transpose(0, 2, 1), rtol=1e-5, atol=1e-5)


def test_gated_delta_net_refuses_shapes_that_do_not_fit():
    g = GraphBuilder()
    fits = {"s0": g.input("s0", (1, 8, 24)), "q": g.input("q", (1, 3, 16)), "k": g.input("q", (1, 3, 16)),
            "v": g.input("v", (1, 3, 24)), "g": g.input("g", (1, 3, 4)), "beta": g.input("g", (1, 3, 4))}
    g.gated_delta_net(**fits)                                   # 2 key heads of 8 serve 4 value heads of 6
    for bad in ({"v": g.input("v3", (1, 3, 20))},                       # not the state's width
                {"g": g.input("g3", (1, 3, 3))},                        # beta's heads differ
                {"s0": g.input("s3", (1, 5, 24))},                      # key heads of 5 do not make 16
                {"q": g.input("q3", (1, 3, 24)), "k": g.input("q3", (1, 3, 24))}):   # 3 key heads for 4 value heads
        with pytest.raises(ValueError, match="gated_delta_net"):
            g.gated_delta_net(**(fits | bad))
